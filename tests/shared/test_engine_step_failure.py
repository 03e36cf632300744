"""A step that raises fails the requests in it, not the engine: they end with `error`, their
blocks are freed, and later requests are served. Device faults and repeated failures re-raise.
The fault is injected in the real runner (a request whose prompt starts with POISON), sync and
async scheduling."""

from __future__ import annotations

import pytest

from splitserve.shared.engine import MAX_FAILED_STEPS
from splitserve.shared.llm import LLM
from splitserve.shared.sampling_params import SamplingParams

POISON = 3


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def engine(checkpoint_factory, request):
    llm = LLM(checkpoint_factory("llama"), device="cpu", num_blocks=24, block_size=4, max_num_seqs=4,
              max_num_batched_tokens=64, async_scheduling=request.param)
    return llm.engine


@pytest.fixture
def poisoned(engine, monkeypatch):
    """The runner raises `error` whenever a poisoned request is in its batch."""
    state = {"error": TypeError("unsupported operand type(s) for |=: 'set' and 'tuple' (injected)")}

    def guard(original):
        def run(sched, *args, **kwargs):
            if any(s.request.prompt_token_ids[0] == POISON for s in sched.scheduled):
                raise state["error"]
            return original(sched, *args, **kwargs)
        return run

    monkeypatch.setattr(engine.runner, "execute", guard(engine.runner.execute))
    monkeypatch.setattr(engine.runner, "execute_async", guard(engine.runner.execute_async))
    return state


def _params(max_tokens=4):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def _run(engine, limit=500) -> dict:
    finals = {}
    for _ in range(limit):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
        engine.kv.check_integrity()
    assert not engine.has_unfinished_requests()
    return finals


def test_a_failing_step_aborts_its_requests_and_the_engine_goes_on(engine, poisoned):
    engine.add_request("poison", [POISON, 10, 11, 12, 13], _params())
    engine.add_request("bystander", [20, 21, 22], _params())
    finals = _run(engine)
    assert finals["poison"].finish_reason == "error" and "injected" in finals["poison"].error
    assert finals["bystander"].finish_reason in ("error", "length")  # it shared the failing step
    engine.add_request("later", [30, 31, 32, 33], _params(6))
    later = _run(engine)["later"]
    assert later.finish_reason == "length" and later.error is None
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks


def test_a_request_that_keeps_failing_alone_does_not_kill_the_engine(engine, poisoned):
    for i in range(MAX_FAILED_STEPS + 2):  # each fails its own step; a good step comes between
        engine.add_request(f"p{i}", [POISON, 40 + i], _params())
        assert _run(engine)[f"p{i}"].error is not None
        engine.add_request(f"ok{i}", [50 + i, 51], _params(2))
        assert _run(engine)[f"ok{i}"].finish_reason == "length"
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks


def test_device_faults_and_failing_steps_in_a_row_re_raise(engine, poisoned):
    poisoned["error"] = RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
    engine.add_request("fault", [POISON, 60], _params())
    with pytest.raises(RuntimeError, match="CUDA"):
        for _ in range(10):
            engine.step()
    engine.abort_request("fault")
    poisoned["error"] = ValueError("injected")
    engine._failed_steps = 0
    with pytest.raises(ValueError):
        for i in range(MAX_FAILED_STEPS):  # every step fails: the engine itself is broken
            engine.add_request(f"again{i}", [POISON, 61 + i], _params())
            engine.step()
    for rid in list(engine.requests):
        engine.abort_request(rid)
    engine._failed_steps = 0
    _run(engine)
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks
