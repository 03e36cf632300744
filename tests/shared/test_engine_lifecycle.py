"""Random request traffic through the real engine (tiny model, tiny KV pool): adds, steps and aborts
in any order, sync and async scheduling. After every step the pool is consistent; at the end
every block is free and nothing is left in any queue."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitserve.shared.llm import LLM
from splitserve.shared.sampling_params import SamplingParams

ops = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(1, 30), st.integers(1, 12), st.booleans()),
    st.tuples(st.just("step"), st.integers(1, 4)),
    st.tuples(st.just("abort"), st.integers(0, 20)),
), min_size=5, max_size=40)


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def engine(checkpoint_factory, request):
    llm = LLM(checkpoint_factory("llama"), device="cpu", num_blocks=12, block_size=4, max_num_seqs=4,
              max_num_batched_tokens=16, async_scheduling=request.param)
    return llm.engine


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(program=ops)
def test_random_traffic_never_leaks(engine, program):
    added: list[str] = []
    for op in program:
        if op[0] == "add":
            _, prompt_len, max_tokens, sampled = op
            rid = f"r{len(added)}-{id(program)}"
            params = SamplingParams(temperature=1.0 if sampled else 0.0, seed=len(added), max_tokens=max_tokens,
                                    ignore_eos=True)
            engine.add_request(rid, [5 + (i * 7) % 50 for i in range(prompt_len)], params)
            added.append(rid)
        elif op[0] == "step":
            for _ in range(op[1]):
                if engine.has_unfinished_requests():
                    engine.step()
                engine.kv.check_integrity()
        elif added:
            engine.abort_request(added[op[1] % len(added)])
            engine.kv.check_integrity()
    for _ in range(2000):
        if not engine.has_unfinished_requests():
            break
        engine.step()
        engine.kv.check_integrity()
    assert not engine.has_unfinished_requests()
    assert engine.scheduler.num_unfinished == 0
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks
    assert not engine.runner.generators  # per-request state dropped too
