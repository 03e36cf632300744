"""The engine and the offline API: request validation, abort, stop strings, n, seeds, priority, CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from splitserve.shared.config import CacheConfig, ConfigError, EngineConfig, ModelConfig, SchedulerConfig
from splitserve.shared.engine import EngineCore, RequestError
from splitserve.shared.llm import LLM
from splitserve.shared.sampling_params import SamplingParams


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def llm(checkpoint_factory, request):
    """The engine with and without async scheduling (step N+1 launched before N's tokens are read)."""
    return LLM(checkpoint_factory("llama"), device="cpu", num_blocks=128, block_size=4, async_scheduling=request.param)


def _drain(engine: EngineCore, limit: int = 1000) -> dict:
    outputs = {}
    for _ in range(limit):
        if not engine.has_unfinished_requests():
            return outputs
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    raise AssertionError("engine did not finish")


def test_prompt_longer_than_context_is_rejected(llm):
    n = llm.engine.max_model_len
    with pytest.raises(RequestError, match=f"{n} tokens"):
        llm.generate({"prompt_token_ids": [5] * n}, SamplingParams(max_tokens=1))


def test_bad_requests_name_the_problem(llm):
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=-3)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="min_p"):
        SamplingParams(min_p=1.5)
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=99)
    with pytest.raises(RequestError, match="vocabulary"):
        llm.generate({"prompt_token_ids": [10**9]}, SamplingParams(max_tokens=1))
    with pytest.raises(RequestError, match="empty"):
        llm.generate({"prompt_token_ids": []}, SamplingParams(max_tokens=1))
    with pytest.raises(ConfigError, match="block_size"):
        EngineConfig(cache=CacheConfig(block_size=3)).validate()
    with pytest.raises(ConfigError, match="policy"):
        EngineConfig(scheduler=SchedulerConfig(policy="random")).validate()


def test_max_tokens_capped_by_context(llm):
    n = llm.engine.max_model_len
    out = llm.generate({"prompt_token_ids": [7] * (n - 3)}, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3
    assert out[0].outputs[0].finish_reason == "length"


def test_abort_frees_blocks(llm):
    engine = llm.engine
    free_before = engine.kv.num_free_blocks
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    for i in range(3):
        engine.add_request(f"abort-{i}", list(range(5, 25 + i)), params)
    for _ in range(3):
        engine.step()
    assert engine.kv.num_free_blocks < free_before
    assert engine.abort_request("abort-1")
    assert not engine.abort_request("no-such-request")
    outputs = _drain(engine)
    assert "abort-1" not in outputs or not outputs["abort-1"][-1].finished
    assert all(outputs[f"abort-{i}"][-1].finished for i in (0, 2))
    engine.kv.check_integrity()
    assert engine.kv.num_free_blocks == free_before
    assert engine.kv.usage == 0.0


def test_duplicate_request_id_rejected(llm):
    engine = llm.engine
    engine.add_request("dup", [5, 6, 7], SamplingParams(max_tokens=2))
    with pytest.raises(RequestError, match="already in use"):
        engine.add_request("dup", [5, 6, 7], SamplingParams(max_tokens=2))
    _drain(engine)


def test_stop_string_cut_and_never_emitted(llm):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    full = llm.generate("def main(", params)[0].outputs[0]
    assert len(full.text) > 6
    stop = full.text[3:6]
    cut = llm.generate("def main(", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]))[0].outputs[0]
    assert stop not in cut.text
    assert cut.text == full.text[: full.text.index(stop)]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop


def test_offline_text_is_the_decode_of_its_tokens(llm):
    """Without stop strings LLM.generate decodes each output once at the end; with one that never
    matches it decodes token by token: both give the tokenizer's decode of the tokens."""
    prompts = ["def main(", "x = [1, 2", "The quick brown fox"]
    plain = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    watched = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=["\x00never\x00"])
    for a, b in zip(llm.generate(prompts, plain), llm.generate(prompts, watched)):
        a, b = a.outputs[0], b.outputs[0]
        assert a.token_ids == b.token_ids and a.text == b.text
        assert a.text == llm.tokenizer.decode(a.token_ids, skip_special_tokens=True)


def test_stop_token_ids(llm):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    full = llm.generate("import os", params)[0].outputs[0]
    stop_id = full.token_ids[4]
    cut = llm.generate("import os", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                    stop_token_ids=[stop_id]))[0].outputs[0]
    assert cut.token_ids == full.token_ids[: full.token_ids.index(stop_id) + 1]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop_id


def test_seeded_sampling_reproduces_across_batches(llm):
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate("class Foo:", seeded)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    batch = llm.generate(["x = 1", "class Foo:", "return"], [others, seeded, others])
    assert batch[1].outputs[0].token_ids == alone
    different = llm.generate("class Foo:", SamplingParams(temperature=1.0, seed=99, max_tokens=16, ignore_eos=True))
    assert different[0].outputs[0].token_ids != alone


def test_n_samples(llm):
    out = llm.generate("for i in", SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8, ignore_eos=True))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert all(len(o.token_ids) == 8 for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1


def test_logprobs_top_n(llm):
    out = llm.generate("while True:", SamplingParams(temperature=0, max_tokens=4, logprobs=3))[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids)
    for token_id, entry in zip(out.token_ids, out.logprobs):
        assert token_id in entry and entry[token_id].rank == 1  # greedy picks the top token
        assert len(entry) == 3
    assert out.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs)))


def test_priority_policy_runs_urgent_first(checkpoint_factory):
    llm = LLM(checkpoint_factory("llama"), device="cpu", num_blocks=64, block_size=4, max_num_seqs=1,
              scheduling_policy="priority")
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    engine.add_request("late-low", [5, 6, 7], params, priority=5)
    engine.add_request("urgent", [8, 9, 10], params, priority=-1)
    first_finished = None
    while engine.has_unfinished_requests() and first_finished is None:
        done = [o.request_id for o in engine.step() if o.finished]
        first_finished = done[0] if done else None
    assert first_finished == "urgent"
    _drain(engine)


def test_penalties_identical_sync_and_async(checkpoint_factory):
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, repetition_penalty=1.3,
                            frequency_penalty=0.5, presence_penalty=0.3)
    outs = [LLM(checkpoint_factory("llama"), device="cpu", num_blocks=64, async_scheduling=mode).generate(
        ["x = 1", "def f(a, b):"], params) for mode in (False, True)]
    assert [o.outputs[0].token_ids for o in outs[0]] == [o.outputs[0].token_ids for o in outs[1]]


def test_async_scheduling_defaults_off_on_cpu_and_follows_the_flag(checkpoint_factory):
    model_dir = checkpoint_factory("llama")
    for flag, expected in ((None, False), (True, True), (False, False)):
        config = EngineConfig(model=ModelConfig(model=model_dir, device="cpu"), cache=CacheConfig(num_blocks=8),
                              scheduler=SchedulerConfig(async_scheduling=flag))
        assert EngineCore(config).async_scheduling is expected


def test_stats(llm):
    stats = llm.engine.stats()
    assert stats.num_total_blocks == 128 and stats.num_running == 0 and 0.0 <= stats.prefix_hit_rate <= 1.0


def test_cli_generate_demo_checkpoint(tmp_path):
    env = dict(os.environ, SPLITSERVE_CACHE=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-m", "splitserve.cli", "generate", "--prompt", "Hello", "--max-tokens", "8",
                           "--device", "cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "8 tokens, finish_reason=length" in done.stderr
    assert done.stdout.strip()


def test_cli_generate_bad_model_dir(tmp_path):
    done = subprocess.run([sys.executable, "-m", "splitserve.cli", "generate", "--model", str(tmp_path / "nope"),
                           "--prompt", "hi"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "nope" in done.stderr and "Traceback" not in done.stderr


def test_unknown_architecture(tmp_path, checkpoint_factory):
    import json
    import shutil

    src = checkpoint_factory("llama")
    dst = tmp_path / "weird"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        EngineCore(EngineConfig(model=ModelConfig(model=str(dst), device="cpu"), cache=CacheConfig(num_blocks=8)))


def test_kv_budget_is_this_engines_share_of_the_device_capped_by_free_memory():
    from splitserve.shared.engine_parts import kv_cache_budget_bytes

    gib = 2**30
    # Alone on an 80 GiB device at 0.9: 72 GiB share, minus 3 GiB held, minus 2 GiB headroom.
    assert kv_cache_budget_bytes(80 * gib, 77 * gib, 0.9, 3 * gib, 2 * gib) == 67 * gib
    # A second engine at 0.45 beside one that took 36 GiB: its share does not shrink by the other's
    # memory (vLLM semantics) ...
    assert kv_cache_budget_bytes(80 * gib, 41 * gib, 0.45, 3 * gib, 2 * gib) == 31 * gib
    # ... but it never takes more than is free: here the other process left only 20 GiB.
    assert kv_cache_budget_bytes(80 * gib, 20 * gib, 0.45, 3 * gib, 2 * gib) == 18 * gib
    assert kv_cache_budget_bytes(80 * gib, 1 * gib, 0.45, 3 * gib, 2 * gib) < 0
