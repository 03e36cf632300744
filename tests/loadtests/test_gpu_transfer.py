"""loadtests/gpu_transfer.py runs end to end on CPU too (UCX over TCP, gloo for the nccl backend):
two real processes, the real TransferConnector, bit-exact blocks and a result table. The same script
measures GB/s on one or two GPUs (docs/benchmarks.md)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "loadtests", "gpu_transfer.py")


@pytest.mark.parametrize("backend", ["ucx", "nccl"])
def test_transfer_benchmark_runs_on_cpu_and_is_bit_exact(backend, tmp_path):
    result = subprocess.run([sys.executable, SCRIPT, "--prefill-device", "cpu", "--decode-device", "cpu",
                             "--layout", "llama-3.2-1b", "--blocks", "4", "--pool-blocks", "16", "--repeats", "1",
                             "--backend", backend], capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith(("contiguous", "scattered"))]
    assert [r[0] for r in rows] == ["contiguous", "scattered"] and all(r[-1] == "True" for r in rows)
    assert "the link's measured peak" in result.stdout


def test_nccl_backend_refuses_one_gpu_for_both_ranks():
    result = subprocess.run([sys.executable, SCRIPT, "--backend", "nccl", "--prefill-device", "cuda:0",
                             "--decode-device", "cuda:0"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "different GPUs" in result.stderr
