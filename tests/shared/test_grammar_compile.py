"""The compile threads (shared/grammar_compile.py): a compile past its timeout fails and its thread
is replaced, abandoned threads are bounded, and they come back once their compile ends."""

from __future__ import annotations

import threading

from splitserve.shared.grammar_compile import CompilePool, CompileTimeout


def test_a_compile_past_its_timeout_fails_and_the_next_runs_on_a_new_thread() -> None:
    pool, gate = CompilePool(1, 0.1), threading.Event()
    stuck = pool.submit(gate.wait)
    after = pool.submit(lambda: "compiled")
    assert after.result(timeout=10) == "compiled"
    assert isinstance(stuck.exception(timeout=10), CompileTimeout)
    assert (pool.num_serving, pool.num_abandoned) == (1, 1)
    gate.set()
    pool.close()


def test_abandoned_threads_are_bounded_and_rejoin_when_their_compile_ends() -> None:
    """One thread, one replacement at most: a second overrun leaves the pool without a thread
    (never more than num_threads + max_abandoned of them), until an abandoned compile ends and
    its thread takes the queue again."""
    pool, first, second = CompilePool(1, 0.05, max_abandoned=1), threading.Event(), threading.Event()
    overruns = [pool.submit(first.wait), pool.submit(second.wait)]
    queued = pool.submit(lambda: "compiled")
    for future in overruns:
        assert isinstance(future.exception(timeout=10), CompileTimeout)
    assert (pool.num_serving, pool.num_abandoned) == (0, 2)
    assert not queued.done()  # no thread left to take it
    first.set()  # its thread comes back to the short pool
    assert queued.result(timeout=10) == "compiled"
    second.set()
    pool.close()


def test_a_compile_that_raises_fails_its_future_only() -> None:
    pool = CompilePool(1, 10.0)
    failed = pool.submit(lambda: 1 / 0)
    assert isinstance(failed.exception(timeout=10), ZeroDivisionError)
    assert pool.submit(lambda: 7).result(timeout=10) == 7
    pool.close()
