"""A colocated worker at `-tp 2` (CPU, gloo) as real processes: worker -> engine process (rank 0)
-> follower (rank 1). It serves; a follower killed mid-stream fails the open stream and the worker
exits 1 (for the launcher or Kubernetes to restart it), leaving no rank behind; a killed worker
takes both ranks with it."""

from __future__ import annotations

import glob
import os
import signal

import grpc
import pytest
from stack import all_up, process_running, wait_until
from worker_process import colocated_worker, generate_stream

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tp_workers(tmp_path_factory):
    """The `-tp 2` workers of the two tests below, started at once so that their rank start-ups
    overlap; each test takes one of its own and kills a part of it."""
    cache = tmp_path_factory.mktemp("tp-cache")
    with all_up(*(colocated_worker(cache, "-tp", "2") for _ in range(2))) as workers:
        yield list(workers)


def _followers(engine_pid: int) -> list[int]:
    """The engine process's tensor-parallel ranks (spawned children; not multiprocessing's resource tracker)."""
    pids = []
    for path in glob.glob(f"/proc/{engine_pid}/task/*/children"):
        with open(path) as f:
            pids += [int(p) for p in f.read().split()]
    return [p for p in pids if b"spawn_main" in open(f"/proc/{p}/cmdline", "rb").read()]


def test_a_killed_follower_fails_the_stream_and_the_worker_exits_1_leaving_no_rank(tp_workers):
    with tp_workers.pop() as worker:
        engine = worker.engine_pid
        followers = _followers(engine)
        assert len(followers) == 1
        channel, stream = generate_stream(worker, "served", 4)
        with channel:
            assert sum(len(chunk.token_ids) for chunk in stream) == 4
        channel, stream = generate_stream(worker, "doomed", 1900)
        with channel, pytest.raises(grpc.RpcError) as failure:
            for i, _ in enumerate(stream):
                if i == 2:
                    os.kill(followers[0], signal.SIGKILL)
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "engine failed" in failure.value.details() and "ParallelError" in failure.value.details()
        assert worker.wait(60) == 1
        wait_until(lambda: not process_running(engine), 30, message="engine process (rank 0) gone")


def test_no_rank_outlives_a_killed_worker(tp_workers):
    """Rank 0 is the worker's engine process, so this is also the check that an engine does not
    outlive its killed worker (test_worker_process.py has no separate one)."""
    with tp_workers.pop() as worker:
        ranks = [worker.engine_pid, *_followers(worker.engine_pid)]
        assert len(ranks) == 2
        worker.kill()
        wait_until(lambda: not any(process_running(p) for p in ranks), 30, message="every rank gone with its worker")
