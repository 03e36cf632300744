"""A worker and its engine process, as real processes (`splitserve worker` on CPU).

SIGTERM stops both (exit 0); only the engine process loads torch. The engine dying ends the worker with exit code 1 after its open
streams got an error, whether its process is killed (SIGKILL) or a step raises. (An engine whose
worker is killed does not outlive it: test_worker_tensor_parallel.py's killed `-tp 2` worker checks
that its engine process, rank 0, goes with it, by the same PR_SET_PDEATHSIG as at TP=1, beside its
follower; a third plain worker here would cost a start-up to check a subset of that.)
"""

from __future__ import annotations

import os
import signal
import textwrap

import grpc
import pytest

from stack import all_up, process_running, wait_until
from worker_process import WATCHING_THE_FREEZE, colocated_worker, frozen_count, generate_stream

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def plain_workers(tmp_path_factory):
    """The workers (no failpoint) of two tests below, started at once so that their start-ups
    overlap; each test takes one of its own and ends it its way."""
    with all_up(*(colocated_worker(tmp_path_factory.mktemp("cache"), cli=WATCHING_THE_FREEZE)
                  for _ in range(2))) as workers:
        yield list(workers)


def test_sigterm_stops_the_worker_and_its_engine(plain_workers):
    with plain_workers.pop() as worker:
        channel, generate = generate_stream(worker, "served", 5)
        with channel:
            assert sum(len(chunk.token_ids) for chunk in generate) == 5
        engine = worker.engine_pid
        # The gRPC process never loads torch (only its engine process does): it made each worker's
        # start-up and exit seconds of CPU slower, and every test stack pays for two workers.
        assert not loaded_libraries(worker.proc.pid, "libtorch"), "the worker's gRPC process loaded torch"
        assert loaded_libraries(engine, "libtorch")  # what the check above looks for does show torch
        # Its start-up heap is frozen before it is ready: no full collection walks it while it serves.
        assert frozen_count(worker.output()) > 5_000, worker.output()
        worker.terminate()
        assert worker.wait(60) == 0, worker.output()
        wait_until(lambda: not process_running(engine), 30, message="engine process gone")


def loaded_libraries(pid: int, name: str) -> set[str]:
    """The paths of the shared libraries mapped into process `pid` whose file name contains `name`."""
    with open(f"/proc/{pid}/maps") as maps:
        paths = {line.split()[-1] for line in maps if "/" in line}
    return {path for path in paths if name in os.path.basename(path)}


def test_engine_process_killed_fails_the_open_stream_and_the_worker_exits_1(plain_workers):
    with plain_workers.pop() as worker:
        channel, generate = generate_stream(worker, "doomed", 1900)
        with channel, pytest.raises(grpc.RpcError) as failure:
            for i, _ in enumerate(generate):
                if i == 2:
                    os.kill(worker.engine_pid, signal.SIGKILL)
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "engine failed" in failure.value.details() and "code -9" in failure.value.details()
        assert worker.wait(60) == 1
        wait_until(lambda: "its engine died" in worker.output(), 10, message="the worker's reason logged")


def test_a_step_that_raises_fails_the_open_stream_and_the_worker_exits_1(tmp_path):
    """A CUDA error inside a step cannot happen on CPU, so it is injected: a failpoint patched into
    every Python process of the worker (a sitecustomize on PYTHONPATH), the engine process included."""
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent("""
        from splitserve.shared.engine import EngineCore
        step = EngineCore.step
        def failing_step(self):
            if self.requests:
                raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
            return step(self)
        EngineCore.step = failing_step
    """))
    with colocated_worker(tmp_path / "cache", env={"PYTHONPATH": str(tmp_path)}) as worker:
        channel, generate = generate_stream(worker, "doomed", 8)
        with channel, pytest.raises(grpc.RpcError) as failure:
            list(generate)
        assert "engine failed" in failure.value.details() and "illegal memory access" in failure.value.details()
        assert worker.wait(60) == 1
        wait_until(lambda: "its engine died" in worker.output(), 10, message="the worker's reason logged")

