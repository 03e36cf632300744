"""Structured outputs through the real engine and the demo model: generated JSON schemas, regex
and choice, with async scheduling on and off, chunked prefill, preemption, n > 1, stop strings,
max_tokens, specs that do not compile, and requests whose compile never starts."""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitserve import LLM, SamplingParams
from splitserve.shared.structured_outputs import StructuredOutputsParams as Spec

PROMPTS = ["def parse(config):", "import json\n", "Hello there, ", "x = {", "The answer is"]

_names = st.sampled_from(["a", "b", "id", "name", "x_y"])
_leaves = st.one_of(
    st.integers(1, 6).map(lambda n: {"type": "string", "maxLength": n}),
    st.just({"type": "string", "pattern": "^[a-z]{1,4}$"}),
    st.lists(st.sampled_from(["red", "green", "blue", "x y"]), min_size=1, max_size=3, unique=True)
    .map(lambda values: {"enum": values}),
    st.tuples(st.integers(-50, 0), st.integers(0, 50)).map(lambda r: {"type": "integer", "minimum": r[0], "maximum": r[1]}),
    st.just({"type": "boolean"}),
)


def _object(children):
    return st.dictionaries(_names, children, min_size=1, max_size=3).flatmap(
        lambda props: st.lists(st.sampled_from(sorted(props)), unique=True).map(
            lambda required: {"type": "object", "properties": props, "required": required,
                              "additionalProperties": False}))


def _array(children):
    return st.tuples(children, st.integers(1, 3)).map(
        lambda t: {"type": "array", "items": t[0], "minItems": 1, "maxItems": t[1]})


SCHEMAS = st.recursive(_leaves, lambda children: st.one_of(_object(children), _array(children)), max_leaves=4)
TOP_LEVEL = _object(SCHEMAS)


@pytest.fixture(scope="module")
def sync_llm(demo_checkpoint_dir):
    # A small step budget, so longer prompts are chunked.
    return LLM(demo_checkpoint_dir, async_scheduling=False, max_num_batched_tokens=48)


@pytest.fixture(scope="module")
def async_llm(demo_checkpoint_dir):
    return LLM(demo_checkpoint_dir, async_scheduling=True, max_num_batched_tokens=48)


@pytest.fixture(scope="module")
def guidance_sync_llm(demo_checkpoint_dir):
    return LLM(demo_checkpoint_dir, async_scheduling=False, max_num_batched_tokens=48,
               structured_outputs_backend="guidance")


@pytest.fixture(scope="module")
def guidance_async_llm(demo_checkpoint_dir):
    return LLM(demo_checkpoint_dir, async_scheduling=True, max_num_batched_tokens=48,
               structured_outputs_backend="guidance")


@pytest.fixture(params=["sync", "async", "guidance_sync", "guidance_async"])
def llm(request):
    """Both grammar backends (xgrammar, llguidance), each with async scheduling off and on."""
    return request.getfixturevalue(f"{request.param}_llm")


def _json_params(schema, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=256, structured_outputs=Spec(json=schema), **kwargs)


@settings(max_examples=2, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(schemas=st.lists(TOP_LEVEL, min_size=5, max_size=5))
def test_generated_schemas_validate(llm, schemas) -> None:
    """A batch of schemas (greedy and sampled rows, and one unconstrained row) in one engine."""
    params = [_json_params(s, temperature=0.0 if i % 2 else 0.9, seed=i) for i, s in enumerate(schemas)]
    prompts = [PROMPTS[i % len(PROMPTS)] * (1 + i) for i in range(len(schemas))]  # some chunked
    outs = llm.generate(prompts + ["free text"], params + [SamplingParams(max_tokens=8, temperature=0.0)])
    for schema, out in zip(schemas, outs):
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", (schema, completion.text)
        jsonschema.validate(json.loads(completion.text), schema)
    assert len(outs[-1].outputs[0].token_ids) == 8  # the unconstrained row is not held back


@pytest.mark.parametrize("backend", ["", "guidance_"])
def test_async_and_sync_give_the_same_greedy_output(request, backend) -> None:
    schema = {"type": "object", "properties": {"k": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                               "maximum": 9}, "maxItems": 4}},
              "required": ["k"], "additionalProperties": False}
    specs = [Spec(json=schema), Spec(regex="[a-c]{2,6}-[0-9]{1,3}"), Spec(choice=["alpha", "beta", "gamma"])]
    texts = []
    for llm in (request.getfixturevalue(f"{backend}sync_llm"), request.getfixturevalue(f"{backend}async_llm")):
        outs = llm.generate(PROMPTS[:3], [SamplingParams(temperature=0.0, max_tokens=64, structured_outputs=s)
                                          for s in specs])
        texts.append([o.outputs[0].text for o in outs])
    assert texts[0] == texts[1]
    jsonschema.validate(json.loads(texts[0][0]), schema)
    assert re.fullmatch("[a-c]{2,6}-[0-9]{1,3}", texts[0][1]) and texts[0][2] in ("alpha", "beta", "gamma")


def test_regex_choice_and_n(llm) -> None:
    regex = r"[0-9]{3}-[a-z]{2,5}"
    choices = ["yes", "no", 'it "depends"']
    outs = llm.generate(PROMPTS[:2], [
        SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=32, structured_outputs=Spec(regex=regex)),
        SamplingParams(n=4, temperature=1.5, seed=3, max_tokens=32, structured_outputs=Spec(choice=choices))])
    assert all(re.fullmatch(regex, c.text) and c.finish_reason == "stop" for c in outs[0].outputs)
    assert all(c.text in choices and c.finish_reason == "stop" for c in outs[1].outputs)


def test_penalties_and_grammar_in_one_step(llm) -> None:
    """Penalised rows settle the previous step first; grammar rows then defer their sampling."""
    regex = "[a-e]{3,8}"
    outs = llm.generate(PROMPTS[:3], [
        SamplingParams(temperature=0.0, max_tokens=24, repetition_penalty=1.3, structured_outputs=Spec(regex=regex)),
        SamplingParams(temperature=0.0, max_tokens=12, frequency_penalty=1.0, ignore_eos=True),
        SamplingParams(temperature=0.7, seed=2, max_tokens=24, structured_outputs=Spec(regex=regex))])
    assert re.fullmatch(regex, outs[0].outputs[0].text) and re.fullmatch(regex, outs[2].outputs[0].text)
    assert len(outs[1].outputs[0].token_ids) == 12


def test_stop_strings_and_max_tokens_still_end_a_structured_request(llm) -> None:
    stopped = llm.generate("x", SamplingParams(temperature=0.0, max_tokens=32, stop=["-"],
                                               structured_outputs=Spec(choice=["abc-def"])))[0].outputs[0]
    assert (stopped.text, stopped.finish_reason, stopped.stop_reason) == ("abc", "stop", "-")
    cut = llm.generate("x", SamplingParams(temperature=0.0, max_tokens=3,
                                           structured_outputs=Spec(json_object=True)))[0].outputs[0]
    assert cut.finish_reason == "length" and len(cut.token_ids) == 3 and cut.text.startswith("{")


def test_ignore_eos_ends_when_the_grammar_is_complete(llm) -> None:
    out = llm.generate("x", SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True,
                                           structured_outputs=Spec(regex="ab")))[0].outputs[0]
    assert (out.text, out.finish_reason) == ("ab", "stop")


def test_preemption_keeps_the_grammar(demo_checkpoint_dir, sync_llm) -> None:
    """Few KV blocks: requests are preempted and recomputed; their matchers continue unchanged."""
    schema = {"type": "object", "properties": {"v": {"type": "string", "maxLength": 12},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 999}},
              "required": ["v", "n"], "additionalProperties": False}
    # 44-token prompts fill 3 blocks each with 4 slots to spare: decoding soon needs a 4th block.
    prompts = [{"prompt_token_ids": list(range(100 + 50 * i, 144 + 50 * i))} for i in range(3)]
    llm = LLM(demo_checkpoint_dir, num_blocks=10, block_size=16, max_num_batched_tokens=64)
    outs = llm.generate(prompts, _json_params(schema, temperature=0.0))
    assert llm.engine.scheduler.num_preemptions > 0
    reference = sync_llm.generate(prompts, _json_params(schema, temperature=0.0))
    assert [o.outputs[0].text for o in outs] == [o.outputs[0].text for o in reference]
    for out in outs:
        jsonschema.validate(json.loads(out.outputs[0].text), schema)


def test_a_bad_spec_fails_its_request_and_the_engine_goes_on(llm) -> None:
    with pytest.raises(ValueError, match='invalid structured_outputs.json: (Unsupported|Invalid) type:? "?nope'):
        llm.generate("x", SamplingParams(structured_outputs=Spec(json={"type": "nope"})))
    with pytest.raises(ValueError, match="invalid structured_outputs.grammar"):
        llm.generate("x", SamplingParams(structured_outputs=Spec(grammar="root ::= (")))
    out = llm.generate("x", SamplingParams(temperature=0.0, max_tokens=8, structured_outputs=Spec(regex="[xy]{4}")))
    assert re.fullmatch("[xy]{4}", out[0].outputs[0].text)
    assert not llm.engine.has_unfinished_requests() and llm.engine.kv.num_free_blocks == llm.engine.kv.pool.num_blocks


def test_a_grammar_no_output_satisfies_is_a_request_error(llm, caplog) -> None:
    """Grammars that compile but admit no output are the request's error (a 400 at the gateway,
    n > 1 too), found when compiling, not a sampled token the grammar rejects (a 503 before)."""
    for spec in (Spec(grammar="root ::= root"), Spec(regex=r"[^\s\S]")):
        with pytest.raises(ValueError, match=r"invalid structured_outputs\.\w+: no output can satisfy it "
                                             r"\(no token may begin it\)"):
            llm.generate("x", SamplingParams(n=2, temperature=1.0, max_tokens=4, structured_outputs=spec))
    assert "violates its grammar" not in caplog.text
    out = llm.generate("x", SamplingParams(temperature=0.0, max_tokens=8, structured_outputs=Spec(regex="[xy]{4}")))
    assert re.fullmatch("[xy]{4}", out[0].outputs[0].text)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_grammar_that_dead_ends_fails_as_the_requests_error(demo_checkpoint_dir, async_scheduling) -> None:
    """xgrammar lets "a" through, then allows no token: the rejection path finds the grammar's
    mask empty and ends the request as the request's error ('abort', a 400), not an engine fault."""
    from splitserve.shared.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from splitserve.shared.engine import EngineCore

    core = EngineCore(EngineConfig(ModelConfig(demo_checkpoint_dir), CacheConfig(),
                                   SchedulerConfig(async_scheduling=async_scheduling)))
    try:
        spec = Spec(grammar='root ::= "a" [^\\x00-\\U0010FFFF]')
        core.add_request("dead", [5, 6, 7], SamplingParams(max_tokens=8, structured_outputs=spec))
        core.add_request("fine", [5, 6, 7], SamplingParams(max_tokens=8, structured_outputs=Spec(regex="[xy]{3}")))
        outputs = []
        while core.has_unfinished_requests():
            outputs += core.step()
        final = {o.request_id: (o.finish_reason, o.error) for o in outputs if o.finished}
        assert final["dead"] == ("abort", "invalid structured_outputs.grammar: no output can satisfy it "
                                          "(no token may follow the 1 generated)")
        assert final["fine"] == ("stop", None)
    finally:
        core.close()


def test_a_compile_that_never_starts_is_busy_and_abort_while_compiling(demo_checkpoint_dir) -> None:
    """The compile threads are taken (one, stuck, and no replacement): the request whose compile
    never starts ends as busy (AsyncEngine: EngineBusyError, a 429), not as a bad spec."""
    from splitserve.shared.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from splitserve.shared.engine import EngineCore
    from splitserve.shared.grammar_compile import CompilePool

    core = EngineCore(EngineConfig(ModelConfig(demo_checkpoint_dir), CacheConfig(),
                                   SchedulerConfig(grammar_compile_timeout_s=0.2)))
    release = threading.Event()
    core.grammars.compiler._pool = CompilePool(1, 0.2, max_abandoned=0)
    core.grammars.compiler._pool.submit(release.wait)  # the one compile thread is stuck: nothing compiles
    try:
        core.add_request("late", [5, 6, 7], SamplingParams(structured_outputs=Spec(regex="late-[0-9]")))
        core.add_request("gone", [5, 6, 7], SamplingParams(structured_outputs=Spec(regex="gone-[0-9]")))
        assert core.abort_request("gone") and "gone" not in core.grammars
        outputs = []
        while core.has_unfinished_requests():
            outputs += core.step()
            release.wait(0.01)
        assert [(o.request_id, o.finish_reason, o.error) for o in outputs] == [
            ("late", "busy", "the server is busy compiling other requests' grammars: this request's did not "
                             "start within 0.2 s; try again")]
    finally:
        release.set()
        core.close()


@pytest.mark.parametrize("threads", [2, 1])
def test_mixed_batch_same_tokens_with_fill_threads_and_async(demo_checkpoint_dir, sync_llm, threads) -> None:
    """One batch of rows with and without grammars, some finishing early (a complete choice, a
    grammar complete under ignore_eos, max_tokens): async steps whose bitmasks fill on the grammar
    pool (2 threads, or 1) beside the step loop give the tokens of synchronous steps."""
    threaded = LLM(demo_checkpoint_dir, async_scheduling=True, max_num_batched_tokens=48,
                   structured_outputs_threads=threads)
    assert threaded.engine._bitmasks.num_threads == threads
    schema = {"type": "object", "properties": {"v": {"type": "array", "items": {"enum": ["a", "bb", "c d"]},
                                                     "maxItems": 5}}, "required": ["v"], "additionalProperties": False}
    params = [SamplingParams(temperature=0.0, max_tokens=32, structured_outputs=Spec(json=schema)),
              SamplingParams(temperature=0.0, max_tokens=10),
              SamplingParams(temperature=0.8, seed=4, max_tokens=32, structured_outputs=Spec(regex="[a-d]{2,9}")),
              SamplingParams(temperature=0.0, max_tokens=64, structured_outputs=Spec(choice=["ok"])),
              SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True, structured_outputs=Spec(regex="xy")),
              SamplingParams(temperature=0.0, max_tokens=3, structured_outputs=Spec(json=schema)),
              SamplingParams(temperature=0.9, seed=8, max_tokens=12)]
    prompts = [PROMPTS[i % len(PROMPTS)] * (1 + i % 3) for i in range(len(params))]
    runs = [[(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in llm.generate(prompts, params)]
            for llm in (sync_llm, threaded)]
    assert threaded.engine._bitmasks._pool  # the async steps filled on the grammar pool
    threaded.engine.close()
    assert runs[0] == runs[1]
    reasons = [reason for _, reason in runs[0]]
    assert reasons[1:] == ["length", "stop", "stop", "stop", "length", "length"]
    assert len(runs[0][1][0]) == 10 and len(runs[0][5][0]) == 3
