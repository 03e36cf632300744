"""Structured-output parts without a model: the spec, the proto round trip, xgrammar compiling
against the demo tokenizer, and the batched bitmask in the sampler (mixed rows) against a
direct computation."""

from __future__ import annotations

import re
import threading

import pytest
import torch

from splitserve.shared.grammar import GrammarCompiler, GrammarError, RequestGrammar, apply_bitmask, bitmask_width
from splitserve.shared.grammar_fill import BitmaskFiller
from splitserve.shared.protocol import convert
from splitserve.shared.sampler import Sampler, SamplingInput
from splitserve.shared.sampling_params import SamplingParams
from splitserve.shared.structured_outputs import StructuredOutputsParams as Spec

VOCAB = 4096  # the demo checkpoint's


@pytest.fixture(scope="module")
def compiler(demo_checkpoint_dir):
    c = GrammarCompiler(demo_checkpoint_dir, VOCAB)
    yield c
    c.close()


def test_spec_needs_exactly_one_kind_of_the_right_type() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        Spec()
    with pytest.raises(ValueError, match="exactly one.*json, regex"):
        Spec(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="not valid JSON"):
        Spec(json="{nope")
    with pytest.raises(ValueError, match="choice must be a non-empty list"):
        Spec(choice=[])
    with pytest.raises(ValueError, match="json_object must be true"):
        Spec(json_object="yes")
    assert Spec(json='{"b": 1, "a": 2}').key() == Spec(json={"a": 2, "b": 1}).key()


@pytest.mark.parametrize("spec", [Spec(json={"type": "object", "properties": {"a": {"type": "integer"}}}),
                                  Spec(regex="[a-z]+"), Spec(choice=["yes", 'no "way"']),
                                  Spec(grammar='root ::= "x" | "y"'), Spec(json_object=True)])
def test_spec_crosses_the_proto_unchanged(spec: Spec) -> None:
    msg = convert.sampling_params_to_proto(SamplingParams(structured_outputs=spec))
    back = convert.sampling_params_from_proto(msg).structured_outputs
    assert back.kind == spec.kind and back.key() == spec.key()
    assert convert.sampling_params_from_proto(convert.sampling_params_to_proto(SamplingParams())).structured_outputs is None


@pytest.mark.parametrize("spec, message", [
    (Spec(json={"type": "foo"}), 'invalid structured_outputs.json: Unsupported type "foo"'),
    (Spec(regex="(ab"), "invalid structured_outputs.regex: Regex parsing error at position 4: The parenthesis is not closed"),
    (Spec(grammar="root ::= missing"), 'invalid structured_outputs.grammar: EBNF parser error at line 1, column 10: Rule "missing"'),
])
def test_a_spec_that_does_not_compile_names_the_problem(compiler, spec, message) -> None:
    with pytest.raises(GrammarError) as err:
        compiler.submit(spec).result(timeout=60)
    assert str(err.value).startswith(message), str(err.value)
    assert "/project/" not in str(err.value)  # xgrammar's source location is dropped


def test_compiled_once_per_spec(compiler) -> None:
    first = compiler.submit(Spec(regex="[0-9]+"))
    assert compiler.submit(Spec(regex="[0-9]+")) is first
    assert compiler.submit(Spec(regex="[0-9]*")) is not first


def test_compiling_runs_off_the_calling_thread(demo_checkpoint_dir) -> None:
    compiler = GrammarCompiler(demo_checkpoint_dir, VOCAB, num_threads=1)
    release = threading.Event()
    blocker = compiler._pool.submit(release.wait)  # occupy the compile thread with real work
    future = compiler.submit(Spec(regex="never-before-seen-[0-9]+"))
    assert not future.done()  # submit returned without compiling
    release.set()
    blocker.result(timeout=10)
    assert future.result(timeout=60) is not None
    compiler.close()


def _text_tokens(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def test_choice_matcher_accepts_exactly_the_choices(compiler, demo_checkpoint_dir) -> None:
    from splitserve.shared.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(demo_checkpoint_dir)
    compiled = compiler.submit(Spec(choice=["yes", 'no "way"'])).result(timeout=60)
    eos = tokenizer.convert_tokens_to_ids("</s>")
    grammar = RequestGrammar(compiled, [eos], _text_tokens(tokenizer, 'no "way"'))
    assert not grammar.terminated and grammar.accept(eos) and grammar.terminated
    with pytest.raises(GrammarError):
        RequestGrammar(compiled, [eos], _text_tokens(tokenizer, "maybe"))
    without_stop = RequestGrammar(compiled, [], _text_tokens(tokenizer, "yes"))
    assert without_stop.terminated  # no stop token (ignore_eos): complete means done


def _filler(num_threads: int = 1) -> BitmaskFiller:
    return BitmaskFiller(VOCAB, torch.device("cpu"), num_threads)


def _direct_mask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Bit t of row i clear -> token t forbidden, in the listed rows only; computed token by token."""
    out = logits.clone()
    for i in rows:
        for t in range(logits.shape[1]):
            if not (int(bitmask[i, t // 32]) >> (t % 32)) & 1:
                out[i, t] = float("-inf")
    return out


def test_apply_bitmask_masks_only_the_rows_with_a_grammar() -> None:
    torch.manual_seed(0)
    num_rows, vocab = 5, 70  # not a multiple of 32: the last word is partly past the vocabulary
    logits = torch.randn(num_rows, vocab)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (num_rows, bitmask_width(vocab)), dtype=torch.int32)
    rows = [0, 2, 3]
    expected = _direct_mask(logits, bitmask, rows)
    apply_bitmask(logits, bitmask, rows)
    assert torch.equal(logits, expected)


def test_sampler_with_mixed_rows(compiler, demo_checkpoint_dir) -> None:
    """Grammar rows only ever sample allowed tokens; rows without one sample as if alone."""
    torch.manual_seed(1)
    compiled = compiler.submit(Spec(regex="[0-9]{2}")).result(timeout=60)
    grammars = [RequestGrammar(compiled, [1]), None, RequestGrammar(compiled, [1]), None]
    built = _filler().build(grammars)
    assert built is not None and built[1].tolist() == [0, 2]
    bitmask, rows = built[0], built[1].tolist()
    logits = torch.randn(4, VOCAB)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0),
              SamplingParams(temperature=1.0, seed=5), SamplingParams(temperature=1.0, seed=7)]
    inputs = [SamplingInput(p, [0], [], torch.Generator().manual_seed(p.seed) if p.seed else None) for p in params]
    unconstrained = Sampler()(logits.clone(), inputs).token_ids
    inputs = [SamplingInput(p, [0], [], torch.Generator().manual_seed(p.seed) if p.seed else None) for p in params]
    constrained = Sampler()(logits.clone(), inputs, built).token_ids
    allowed = _direct_mask(logits, bitmask, rows)
    for i in rows:
        assert allowed[i, constrained[i]] > float("-inf")
    assert constrained[0] == int(allowed[0].argmax())
    assert [constrained[1], constrained[3]] == [unconstrained[1], unconstrained[3]]
    assert _filler().build([None, None]) is None


def test_min_tokens_does_not_fight_the_grammar(compiler) -> None:
    """With a grammar, min_tokens does not ban EOS: the grammar decides where the output ends."""
    compiled = compiler.submit(Spec(choice=["a"])).result(timeout=60)
    grammar = RequestGrammar(compiled, [1])
    tokens = []
    logits = torch.zeros(1, VOCAB)
    params = SamplingParams(temperature=0.0, min_tokens=5, structured_outputs=Spec(choice=["a"]))
    for _ in range(4):
        built = _filler().build([grammar])
        if built is None:
            break
        token = Sampler()(logits.clone(), [SamplingInput(params, [0], tokens, None, frozenset({1}))], built).token_ids[0]
        assert grammar.accept(token)
        tokens.append(token)
    assert tokens[-1] == 1 and grammar.terminated and len(tokens) < 5


def test_error_text_has_no_timestamp() -> None:
    from splitserve.shared.grammar import _clean

    assert _clean(RuntimeError("[09:34:29] /project/cpp/x.cc:94: Regex parsing error")) == "Regex parsing error"
    assert re.match("Failed", _clean(RuntimeError("[1:2:3] /a/b.cc:1: Check failed: (e) is false: Failed to parse")))


def test_length_bounded_json_strings_reject_control_characters(compiler, demo_checkpoint_dir) -> None:
    """xgrammar 0.2.9 lets raw control characters into strings with maxLength; JSON does not."""
    import xgrammar as xgr

    compiled = compiler.submit(Spec(json={"type": "string", "maxLength": 4})).result(timeout=60)
    for text, ok in [('"ab"', True), ('"a\x06"', False), ('"abcde"', False)]:
        matcher = xgr.GrammarMatcher(compiled)
        assert (matcher.accept_string(text) and matcher.is_completed()) is ok, text


def _grammars_in_many_states(compiler, demo_checkpoint_dir) -> list:
    """Rows of a step: grammars of several kinds part-way through their text, rows without one,
    and a terminated grammar (nothing left to fill)."""
    from splitserve.shared.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(demo_checkpoint_dir)
    eos = tokenizer.convert_tokens_to_ids("</s>")
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
              "required": ["name", "n"], "additionalProperties": False}
    # Properties in sorted order: the spec's canonical schema text sorts its keys.
    cases = [(Spec(json=schema), '{"n": 12, "name": "ab'), (Spec(json=schema), '{"n": 1'), (Spec(json=schema), ""),
             (Spec(regex="[0-9]{2,4}-[a-z]+"), "12"), (Spec(regex="[0-9]{2,4}-[a-z]+"), "123-ab"),
             (Spec(choice=["alpha", "beta"]), "al"), (Spec(json_object=True), '{"k": [1, ')]
    grammars = [RequestGrammar(compiler.submit(spec).result(timeout=60), [eos], _text_tokens(tokenizer, text))
                for spec, text in cases]
    done = RequestGrammar(compiler.submit(Spec(choice=["yes"])).result(timeout=60), [eos],
                          [*_text_tokens(tokenizer, "yes"), eos])
    assert done.terminated
    return [grammars[0], None, *grammars[1:4], done, None, *grammars[4:]]


def test_batched_fill_matches_each_matcher_alone_with_any_thread_count(compiler, demo_checkpoint_dir) -> None:
    """One step's fill (1 to 3 pool threads, waited by build or by result) writes each live row
    exactly as that row's matcher fills it alone; other rows are left out."""
    grammars = _grammars_in_many_states(compiler, demo_checkpoint_dir)
    live = [i for i, g in enumerate(grammars) if g is not None and not g.terminated]
    expected = torch.zeros(len(grammars), bitmask_width(VOCAB), dtype=torch.int32)
    for i in live:
        grammars[i].fill(expected, i)
    for num_threads in (1, 2, 3):
        filler = _filler(num_threads)
        for _ in range(2):  # the second fill reuses the first one's buffer
            bitmask, rows = filler.build(grammars)
            assert rows.tolist() == live and torch.equal(bitmask[live], expected[live])
            bitmask, rows = filler.start([], grammars).result()
            assert rows.tolist() == live and torch.equal(bitmask[live], expected[live])
        filler.close()


def _allowed(bitmask: torch.Tensor, row: int, allowed: bool = True) -> int:
    """The lowest token id the row's mask allows (or forbids)."""
    bits = [(int(bitmask[row, t // 32]) >> (t % 32)) & 1 for t in range(VOCAB)]
    return bits.index(1 if allowed else 0)


def test_start_accepts_the_new_tokens_then_fills(compiler, demo_checkpoint_dir) -> None:
    """start(new tokens, rows): on the pool each matcher takes its token (a forbidden one
    is reported, a stop token terminates the row and leaves it out), then the live rows are
    filled; the same as accepting and filling each matcher alone, with 1 and 3 pool threads."""
    for num_threads in (1, 3):
        alone, batched = (_grammars_in_many_states(compiler, demo_checkpoint_dir) for _ in range(2))
        before = torch.zeros(len(alone), bitmask_width(VOCAB), dtype=torch.int32)
        rows = [i for i, g in enumerate(alone) if g is not None and not g.terminated]
        for i in rows:
            alone[i].fill(before, i)
        tokens = {i: _allowed(before, i) for i in rows}
        tokens[rows[1]] = _allowed(before, rows[1], allowed=False)  # rejected: the matcher stays as it was
        complete = [i for i in rows if int(before[i, 0]) & 2]  # EOS (id 1) allowed: the grammar may end
        assert complete and rows[1] not in complete
        tokens[complete[0]] = 1
        accepted = [alone[i].accept(tokens[i]) for i in rows]
        expected = torch.zeros_like(before)
        live = [i for i in rows if not alone[i].terminated]
        assert complete[0] not in live and rows[1] in live
        for i in live:
            alone[i].fill(expected, i)
        filler = _filler(num_threads)
        fill = filler.start([(batched[i], tokens[i]) for i in rows], batched)
        assert fill.wait_accepted() == accepted and accepted[1] is False
        assert [batched[i].terminated for i in rows] == [alone[i].terminated for i in rows]
        bitmask, filled = fill.result()
        assert filled.tolist() == live and torch.equal(bitmask[live], expected[live])
        filler.close()


def test_a_fill_that_fails_raises_on_the_step_loops_thread(compiler) -> None:
    """An error inside xgrammar's fill (here: a matcher of another vocabulary size) comes back from
    result(), and the pool goes on with the next step."""
    import xgrammar as xgr

    compiled = compiler.submit(Spec(regex="[0-9]+")).result(timeout=60)
    filler = BitmaskFiller(64, torch.device("cpu"), 1)  # far narrower than the grammar's vocabulary
    with pytest.raises(RuntimeError, match="bitmask"):
        filler.start([], [RequestGrammar(compiled, [1])]).result()
    narrow = xgr.TokenizerInfo([chr(ord("a") + i % 26) * (1 + i // 26) for i in range(64)])
    small = RequestGrammar(xgr.GrammarCompiler(narrow).compile_regex("[a-c]{3}"), [])
    fill = filler.start([(small, 0)], [small])  # token 0 is "a"
    bitmask, rows = fill.result()
    assert fill.wait_accepted() == [True] and rows.tolist() == [0] and int(bitmask[0, 0]) & 0b111 == 0b111
    filler.close()


def test_fill_threads_flag_and_its_bounds() -> None:
    import argparse

    from splitserve.shared.config import ConfigError, SchedulerConfig
    from splitserve.shared.config_flags import add_dataclass_flags
    from splitserve.shared.grammar_fill import default_threads

    parser = argparse.ArgumentParser()
    add_dataclass_flags(parser, SchedulerConfig, "scheduler")
    assert parser.parse_args(["--structured-outputs-threads", "6"]).structured_outputs_threads == 6
    with pytest.raises(ConfigError, match="structured_outputs_threads must be at least 1"):
        SchedulerConfig(structured_outputs_threads=0).validate()
    SchedulerConfig(structured_outputs_threads=1).validate()
    assert 1 <= default_threads() <= 4 and _filler(None).num_threads == default_threads()


@pytest.mark.parametrize("stop_tokens", [[1], []])
def test_terminated_attribute_follows_the_matcher(compiler, stop_tokens) -> None:
    """`terminated` is kept by accept (not asked of the matcher, which a fill may be using):
    it must say what xgrammar says after every token, with and without stop tokens."""
    torch.manual_seed(3)
    compiled = compiler.submit(Spec(regex="(ab|cd)[0-9]{1,3}")).result(timeout=60)
    for _ in range(5):
        grammar, filler = RequestGrammar(compiled, stop_tokens), _filler()
        for _ in range(12):
            built = filler.build([grammar])
            if built is None:
                break
            logits = torch.randn(1, VOCAB)
            apply_bitmask(logits, *built)
            assert grammar.accept(int(logits.argmax()))
            assert grammar.terminated == grammar.matcher.is_terminated()
        assert grammar.terminated


def test_pool_threads_take_their_slices_and_stop_on_close(compiler) -> None:
    """start returns once every pool thread holds its slice (the handshake); the step loop may book
    meanwhile, result gives the same rows as the inline fill; close stops the threads, and a later
    start brings new ones up."""
    compiled = compiler.submit(Spec(regex="[0-9]{3}")).result(timeout=60)
    grammars = [RequestGrammar(compiled, [1]) for _ in range(3)]
    filler = _filler(2)
    expected, rows = (t.clone() for t in filler.build(grammars))
    fill = filler.start([], grammars)
    assert len(fill.slices) == 2 and all(part.taken.is_set() for part in fill.slices)
    threads = list(filler._pool)
    bitmask, filled = fill.result()
    assert torch.equal(bitmask, expected) and torch.equal(filled, rows) and all(t.is_alive() for t in threads)
    filler.close()
    assert not any(t.is_alive() for t in threads)
    bitmask, filled = filler.start([], grammars).result()
    assert torch.equal(bitmask, expected) and filler._pool[0] is not threads[0]
    filler.close()


# ---- the waitlist: whose fault a compile that does not finish is ---------------------------------

class _GatedBackend:
    """A backend whose compile of a spec waits until the test opens that spec's gate."""

    def __init__(self) -> None:
        self.gates: dict[tuple[str, str], threading.Event] = {}

    def gate(self, spec: Spec) -> threading.Event:
        return self.gates.setdefault(spec.key(), threading.Event())

    def compile(self, spec: Spec):
        self.gate(spec).wait()
        return spec.key()

    @staticmethod
    def request_grammar(compiled, stop_token_ids, token_ids=()):
        return _CompiledKey(compiled)


class _CompiledKey(tuple):
    """What the gated backend "compiles" a spec to: its key, a grammar with a way on."""

    @staticmethod
    def admits_no_token() -> bool:
        return False


def _gated_waitlist(timeout_s: float, max_abandoned: int = 4):
    from splitserve.shared.grammar import GrammarWaitlist
    from splitserve.shared.grammar_compile import CompilePool

    compiler = GrammarCompiler("/nonexistent", VOCAB, timeout_s=timeout_s)
    compiler._pool.close()
    compiler._pool = CompilePool(1, timeout_s, max_abandoned)  # one thread: a stuck compile holds it
    compiler._backend = _GatedBackend()
    return GrammarWaitlist(compiler), compiler._backend


def _request(request_id: str, spec: Spec):
    from splitserve.shared.request import Request

    return Request(request_id, [1, 2], SamplingParams(structured_outputs=spec), 8)


def _poll_until(waitlist, done, guard_s: float = 10.0) -> tuple[list, list]:
    """Poll as the step loop does until `done(ready, failed)` (all seen so far)."""
    ready, failed, pause = [], [], threading.Event()
    for _ in range(int(guard_s / 0.01)):
        new_ready, new_failed = waitlist.poll()
        ready, failed = ready + new_ready, failed + new_failed
        if done(ready, failed):
            return ready, failed
        pause.wait(0.01)
    raise AssertionError(f"still waiting: ready {ready}, failed {failed}")


STUCK, OTHER = Spec(regex="stuck-[0-9]"), Spec(regex="other-[0-9]")


def test_a_request_queued_behind_a_stuck_compile_gets_its_own_grammar() -> None:
    """The stuck compile overruns: it fails its own request (a 400: too complex), its thread is
    replaced, and the request queued behind it compiles: it is not failed for the other's time."""
    waitlist, backend = _gated_waitlist(0.2)
    backend.gate(OTHER).set()
    stuck, other = _request("stuck", STUCK), _request("other", OTHER)
    waitlist.add(stuck)
    waitlist.add(other)
    ready, failed = _poll_until(waitlist, lambda ready, failed: ready and failed)
    assert ready == [other] and other.grammar == OTHER.key()
    assert [(req.request_id, reason) for req, _, reason in failed] == [("stuck", "abort")]
    assert failed[0][1] == "invalid structured_outputs.regex: it did not compile within 0.2 s (too large or too complex)"
    assert waitlist.compiler.submit(STUCK).exception() is not None  # the failure is cached: no new thread
    backend.gate(STUCK).set()
    waitlist.compiler.close()


def test_a_request_whose_compile_never_started_is_busy_not_blamed() -> None:
    """No thread to compile on (the only one stuck, none to replace it): the waiting request
    fails as busy (429, try again), not as a spec that does not compile (400)."""
    waitlist, backend = _gated_waitlist(0.1, max_abandoned=0)
    waitlist.add(_request("stuck", STUCK))
    waitlist.add(_request("waiting", OTHER))
    _, failed = _poll_until(waitlist, lambda ready, failed: len(failed) == 2)
    reasons = {req.request_id: (reason, message) for req, message, reason in failed}
    assert reasons["stuck"][0] == "abort" and reasons["waiting"][0] == "busy"
    assert "busy" in reasons["waiting"][1] and "try again" in reasons["waiting"][1]
    backend.gate(STUCK).set()
    backend.gate(OTHER).set()
    waitlist.compiler.close()


def test_the_compile_timeout_counts_from_when_the_compile_starts() -> None:
    """The request's compile starts only once the stuck one is abandoned, near its own queue
    deadline; past that deadline it is still compiling, within its own time: it is not failed."""
    import time

    timeout_s = 0.3
    waitlist, backend = _gated_waitlist(timeout_s)
    waitlist.add(_request("stuck", STUCK))
    waitlist.add(_request("late", OTHER))
    added_s = time.monotonic()
    future = waitlist.compiler.submit(OTHER)
    _poll_until(waitlist, lambda ready, failed: future.running())
    threading.Event().wait(max(0.0, added_s + timeout_s - time.monotonic()) + 0.02)  # past its queue deadline
    _, failed = waitlist.poll()
    assert "late" not in [req.request_id for req, _, _ in failed]
    backend.gate(OTHER).set()
    ready, _ = _poll_until(waitlist, lambda ready, failed: ready)
    assert [req.request_id for req in ready] == ["late"]
    backend.gate(STUCK).set()
    waitlist.compiler.close()
