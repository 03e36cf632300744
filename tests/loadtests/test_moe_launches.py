"""loadtests/moe_launches.py on CPU (Triton interpreter): one MoE layer's forward at a decode size
is six launches (the router's GEMM, the routing kernel, alignment, two grouped GEMMs, the k-slot
sum); aligning with the torch ops instead takes ~25 more. Counting ops is deterministic, so the
numbers are exact."""

from __future__ import annotations

import os
import re
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "loadtests", "moe_launches.py")


def test_an_moe_layer_is_six_launches_and_the_torch_alignment_many_more():
    run = subprocess.run([sys.executable, SCRIPT, "--shape", "8,2,32,32", "--tokens", "4"],
                         env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    triton_part, torch_part = run.stdout.split("torch alignment, ")
    launches = int(re.search(r"triton alignment, T=4: (\d+) launches per MoE layer", triton_part).group(1))
    assert launches == 6, run.stdout
    for kernel in ("_route_kernel", "_align_kernel", "_gate_up_kernel", "_down_kernel", "_sum_slots_kernel"):
        assert re.search(rf"^\s+1\s+\S*{kernel}$", triton_part, re.M), (kernel, run.stdout)
    assert "aten._to_copy" not in triton_part and "aten.topk" not in triton_part, run.stdout
    assert "same experts True" in triton_part, run.stdout
    torch_launches = int(re.search(r"^T=4: (\d+) launches", torch_part).group(1))
    assert torch_launches >= launches + 20 and "aten.sort" in torch_part and "_align_kernel" not in torch_part, run.stdout
