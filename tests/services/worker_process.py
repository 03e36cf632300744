"""Test support: one real worker process (`splitserve worker|prefill|decode`) on a free port.

    with WorkerProcess("worker", model_dir, tmp_path) as worker:
        worker.address          # host:port its gRPC server listens on
        worker.output()         # everything it printed so far
        worker.engine_pid       # its engine process

`model_dir` None: no --model, so the worker serves the demo checkpoint from `cache_dir` (linked to
the session's build, tests/demo_cache.py), as `splitserve worker` does on its own:

    with colocated_worker(tmp_path, "-tp", "2") as worker:
        channel, chunks = generate_stream(worker, "r1", max_tokens=5)

Stopping sends SIGTERM, as Kubernetes does, and waits for the exit code.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

from demo_cache import seed_demo
from splitserve.shared.grpc_channel import sync_channel
from splitserve.shared.protocol import worker_pb2 as pb
from splitserve.shared.protocol import worker_pb2_grpc as pb_grpc

READY_TIMEOUT_S = 180.0
_READY = re.compile(r"splitserve \w+ ready on ([\d.]+):(\d+)")


CLI = [sys.executable, "-m", "splitserve.cli"]
WATCHING_THE_FREEZE = [sys.executable, "-c", """
import gc, sys, threading, time
def watch():
    while not gc.get_freeze_count():
        time.sleep(0.02)
    print("frozen", gc.get_freeze_count(), flush=True)
threading.Thread(target=watch, daemon=True).start()
from splitserve.cli import main
sys.exit(main(sys.argv[1:]))
"""]
"""The CLI with a thread beside it that prints `frozen N` once the process has frozen its heap
(shared/heap.py): N objects moved out of the garbage collector's reach."""


def frozen_count(output: str) -> int:
    """N of the first `frozen N` line in a WATCHING_THE_FREEZE process's output, 0 if none."""
    return next((int(line.split()[1]) for line in output.splitlines() if line.startswith("frozen ")), 0)


class WorkerProcess:
    def __init__(self, command: str, model_dir: str | None, cache_dir, *extra_args: str,
                 env: dict[str, str] | None = None, cli: list[str] = CLI) -> None:
        if model_dir is None:
            seed_demo(str(cache_dir))
        model = [] if model_dir is None else ["--model", model_dir]
        argv = [*cli, command, "--host", "127.0.0.1", "--port", "0", *model, "--device", "cpu", *extra_args]
        env = dict(os.environ, SPLITSERVE_CACHE=str(cache_dir), PYTHONUNBUFFERED="1", **(env or {}))
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._lines: list[str] = []
        self._ready = threading.Event()
        self.address = ""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.append(line)
            if (match := _READY.search(line)) and not self._ready.is_set():
                self.address = f"{match[1]}:{match[2]}"
                self._ready.set()
        self._ready.set()  # exited before it was ready: __enter__ reports it

    def output(self) -> str:
        return "".join(self._lines)

    @property
    def engine_pid(self) -> int:
        return int(re.search(r"engine process (\d+)", self.output()).group(1))

    def __enter__(self) -> "WorkerProcess":
        if not self._ready.wait(READY_TIMEOUT_S) or not self.address:
            self.kill()
            raise RuntimeError(f"worker did not become ready:\n{self.output()}")
        return self

    def __exit__(self, *exc) -> None:
        self.kill()

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float) -> int:
        return self.proc.wait(timeout=timeout_s)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


def colocated_worker(cache_dir, *extra_args: str, env: dict[str, str] | None = None,
                     cli: list[str] = CLI) -> WorkerProcess:
    """`splitserve worker` with no --model: the demo checkpoint from its cache."""
    return WorkerProcess("worker", None, cache_dir, *extra_args, env=env, cli=cli)


def generate_stream(worker: WorkerProcess, request_id: str, max_tokens: int):
    """(channel, Generate stream) of one greedy request of 20 prompt tokens on `worker`."""
    request = pb.GenerateRequest(
        request_id=request_id, prompt_token_ids=list(range(10, 30)),
        sampling_params=pb.SamplingParams(temperature=0, top_p=1, repetition_penalty=1, max_tokens=max_tokens,
                                          ignore_eos=True))
    channel = sync_channel(worker.address)
    return channel, pb_grpc.WorkerStub(channel).Generate(request, timeout=120)
