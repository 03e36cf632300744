"""A worker and its engine process, as real processes (`splitserve worker` on CPU).

SIGTERM stops both (exit 0). The engine dying ends the worker with exit code 1 after its open
streams got an error, whether its process is killed (SIGKILL) or a step raises. An engine whose
worker is killed does not outlive it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading

import grpc
import pytest

from splitserve.shared.grpc_channel import sync_channel
from splitserve.shared.protocol import worker_pb2 as pb
from splitserve.shared.protocol import worker_pb2_grpc as pb_grpc
from demo_cache import seed_demo
from stack import READY_TIMEOUT_S, all_up, free_port, process_running, wait_until

pytestmark = pytest.mark.slow


class Worker:
    """A colocated worker process; a thread collects its output."""

    def __init__(self, tmp_path, env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        argv = [sys.executable, "-m", "splitserve.cli", "worker", "--host", "127.0.0.1", "--port", str(self.port),
                "--device", "cpu", *args]
        seed_demo(str(tmp_path / "cache"))
        env = dict(os.environ, SPLITSERVE_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1", **(env or {}))
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            if "ready on" in line:
                self._ready.set()
        self._ready.set()

    def __enter__(self) -> "Worker":
        assert self._ready.wait(READY_TIMEOUT_S) and self.process.poll() is None, self.output()
        return self

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def output(self) -> str:
        return "".join(self.lines)

    @property
    def engine_pid(self) -> int:
        return int(re.search(r"engine process (\d+)", self.output()).group(1))

    def stream(self, request_id: str, max_tokens: int):
        request = pb.GenerateRequest(
            request_id=request_id, prompt_token_ids=list(range(10, 30)),
            sampling_params=pb.SamplingParams(temperature=0, top_p=1, repetition_penalty=1, max_tokens=max_tokens,
                                              ignore_eos=True))
        channel = sync_channel(f"127.0.0.1:{self.port}")
        return channel, pb_grpc.WorkerStub(channel).Generate(request, timeout=120)


@pytest.fixture(scope="module")
def plain_workers(tmp_path_factory):
    """The workers (no failpoint) of three tests below, started at once so that their start-ups
    overlap; each test takes one of its own and ends it its way."""
    with all_up(*(Worker(tmp_path_factory.mktemp("worker")) for _ in range(3))) as workers:
        yield list(workers)


def test_sigterm_stops_the_worker_and_its_engine(plain_workers):
    with plain_workers.pop() as worker:
        channel, stream = worker.stream("served", 5)
        with channel:
            assert sum(len(chunk.token_ids) for chunk in stream) == 5
        engine = worker.engine_pid
        worker.process.send_signal(signal.SIGTERM)
        assert worker.process.wait(60) == 0, worker.output()
        wait_until(lambda: not process_running(engine), 30, message="engine process gone")


def test_engine_process_killed_fails_the_open_stream_and_the_worker_exits_1(plain_workers):
    with plain_workers.pop() as worker:
        channel, stream = worker.stream("doomed", 1900)
        with channel, pytest.raises(grpc.RpcError) as failure:
            for i, _ in enumerate(stream):
                if i == 2:
                    os.kill(worker.engine_pid, signal.SIGKILL)
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "engine failed" in failure.value.details() and "code -9" in failure.value.details()
        assert worker.process.wait(60) == 1
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
    with Worker(tmp_path, env={"PYTHONPATH": str(tmp_path)}) as worker:
        channel, stream = worker.stream("doomed", 8)
        with channel, pytest.raises(grpc.RpcError) as failure:
            list(stream)
        assert "engine failed" in failure.value.details() and "illegal memory access" in failure.value.details()
        assert worker.process.wait(60) == 1
        wait_until(lambda: "its engine died" in worker.output(), 10, message="the worker's reason logged")


def test_the_engine_does_not_outlive_its_killed_worker(plain_workers):
    with plain_workers.pop() as worker:
        engine = worker.engine_pid
        assert process_running(engine)
        worker.process.kill()
        worker.process.wait(10)
        wait_until(lambda: not process_running(engine), 30, message="engine process gone with its worker")
