"""loadtests/moe_launches.py on CPU (Triton interpreter): one MoE layer's forward at a decode size
is nine launches (router, softmax, top-k, renormalising sum and division, alignment, two grouped
GEMMs, the k-slot sum), the alignment one of them; aligning with the torch ops instead takes ~25
more. Counting ops is deterministic, so the numbers are exact."""

from __future__ import annotations

import os
import re
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "loadtests", "moe_launches.py")


def test_an_moe_layer_is_nine_launches_and_the_torch_alignment_many_more():
    run = subprocess.run([sys.executable, SCRIPT, "--shape", "8,2,32,32", "--tokens", "4"],
                         env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    triton_part, torch_part = run.stdout.split("torch alignment, ")
    launches = int(re.search(r"triton alignment, T=4: (\d+) launches per MoE layer", triton_part).group(1))
    assert launches == 9, run.stdout
    for kernel in ("_align_kernel", "_gate_up_kernel", "_down_kernel", "aten._softmax", "aten.topk"):
        assert re.search(rf"^\s+1\s+\S*{kernel}$", triton_part, re.M), (kernel, run.stdout)
    assert "aten._to_copy" not in triton_part and "softmax(dtype=fp32) == softmax(.float()): True" in triton_part
    torch_launches = int(re.search(r"^T=4: (\d+) launches", torch_part).group(1))
    assert torch_launches >= launches + 20 and "aten.sort" in torch_part and "_align_kernel" not in torch_part, run.stdout
