"""`splitserve up`: Ctrl-C (SIGINT) stops every process it started, and the launcher exits 0."""

from __future__ import annotations

import pytest

from stack import LocalStack, process_running, wait_until

pytestmark = pytest.mark.slow


def test_ctrl_c_stops_everything(tmp_path):
    stack = LocalStack(["--prefill", "1", "--decode", "1"], str(tmp_path / "cache"))
    with stack:
        pids = [stack.worker_pid("prefill"), stack.worker_pid("decode")]
        assert all(process_running(pid) for pid in pids)
    assert stack.process.returncode == 0
    wait_until(lambda: not any(process_running(pid) for pid in pids), timeout_s=10, message="workers gone")
    assert any("stopping" in line or "Shutting down" in line for line in stack.lines)
