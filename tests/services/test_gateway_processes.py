"""`splitserve gateway --processes N` as real processes: the parent supervises its N gateways. When
one dies the parent stops the others and exits non-zero (so `splitserve up` or a container
restart policy notices); SIGTERM to the parent stops them all and exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from stack import free_port, process_running, wait_until
from worker_process import WATCHING_THE_FREEZE, frozen_count


def _start(model_dir: str, processes: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    # No worker answers at this address: the gateways still start and serve /health (503).
    argv = [sys.executable, "-m", "splitserve.cli", "gateway", "--port", str(port), "--model", model_dir,
            "--worker-urls", f"127.0.0.1:{free_port()}", "--processes", str(processes)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), f"http://127.0.0.1:{port}"


def _pids(url: str, want: int) -> set[int]:
    seen: set[int] = set()

    def all_seen():
        try:
            seen.add(httpx.get(f"{url}/health", timeout=1.0).json()["pid"])  # 503 until a worker answers
        except httpx.HTTPError:
            pass
        return len(seen) >= want

    wait_until(all_seen, timeout_s=60, interval_s=0.05, message=f"{want} gateway processes answering")
    return seen


def test_one_gateway_dying_stops_the_others_and_the_parent_fails(demo_checkpoint_dir):
    parent, url = _start(demo_checkpoint_dir, 2)
    try:
        first, second = sorted(_pids(url, 2))
        os.kill(first, signal.SIGKILL)
        assert parent.wait(30) != 0
        wait_until(lambda: not process_running(second), timeout_s=15, message="the other gateway stopped")
    finally:
        parent.kill()
        parent.wait(10)


def test_sigterm_stops_every_gateway_process(demo_checkpoint_dir):
    parent, url = _start(demo_checkpoint_dir, 2)
    try:
        pids = _pids(url, 2)  # both serve, so both have their signal handlers
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(30) == 0
        wait_until(lambda: not any(process_running(p) for p in pids), timeout_s=15, message="every gateway stopped")
    finally:
        parent.kill()
        parent.wait(10)


def test_processes_need_a_fixed_port(demo_checkpoint_dir):
    result = subprocess.run([sys.executable, "-m", "splitserve.cli", "gateway", "--port", "0", "--processes", "2",
                             "--model", demo_checkpoint_dir, "--worker-urls", "127.0.0.1:1"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "fixed --port" in result.stderr


def test_a_gateway_process_freezes_its_start_up_heap(demo_checkpoint_dir):
    """The real gateway process moves its start-up objects out of the collector's reach before it
    serves: a full collection of them stalls every stream of the process (docs/benchmarks.md
    section 24)."""
    port = free_port()
    argv = [*WATCHING_THE_FREEZE, "gateway", "--port", str(port), "--model", demo_checkpoint_dir,
            "--worker-urls", f"127.0.0.1:{free_port()}"]
    gateway = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        _pids(f"http://127.0.0.1:{port}", 1)  # it serves, so it has started (and frozen, before serving)
    finally:
        gateway.send_signal(signal.SIGTERM)
        output, _ = gateway.communicate(timeout=30)
    assert frozen_count(output) > 10_000, output[-2000:]  # the app, the tokenizer, the libraries
