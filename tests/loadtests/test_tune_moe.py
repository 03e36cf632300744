"""loadtests/tune_moe.py end to end on a tiny MoE shape, in the Triton interpreter: every candidate
checked against the reference, and a table the kernel's loader reads comes out; a merge into an
existing table keeps its other entries. Also: the GPU grid stays within its pruning rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "loadtests"))

from tune_moe import DEFAULT_SHAPES, DEFAULT_TOKENS, SMEM_BYTES, parse_shapes, sweep_plan  # noqa: E402

from splitserve.kernels.moe_config import MoeLaunchConfig, shape_key  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "loadtests", "tune_moe.py")


def test_sweep_writes_a_table_the_kernel_reads(tmp_path):
    out = tmp_path / "cpu.json"
    other_key = "experts=8,inter=64,hidden=64,top_k=2,dtype=bfloat16"
    out.write_text(json.dumps({"shapes": {other_key: {"1": {"kept": True}}}}))  # an earlier run's entry
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run(
        [sys.executable, SCRIPT, "--shapes", "4,2,32,32", "--tokens", "1,8", "--small-grid", "--dtype", "float32",
         "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "WRONG" not in run.stdout and "no candidate passed" not in run.stdout, run.stdout
    table = json.loads(out.read_text())
    key = shape_key(4, 32, 32, 2, __import__("torch").float32)
    assert table["device"] == "cpu" and table["shapes"][other_key] == {"1": {"kept": True}}
    assert sorted(table["shapes"][key]) == ["1", "8"]
    for tokens, entry in table["shapes"][key].items():
        config = MoeLaunchConfig.from_json(entry)  # what the kernel's loader does with it
        assert config.block_m == 16 and config.gate_up.block_n in (16, 32)
        measured = table["measured"][key][tokens]
        assert measured["rel_err"] < 1e-4 and measured["us"] > 0 and measured["heuristic_us"] > 0


def test_gpu_grid_respects_shared_memory_and_accumulator_bounds():
    shapes = parse_shapes(DEFAULT_SHAPES, tp=1)
    assert [s.name for s in shapes] == ["qwen3-30b-a3b", "mixtral-8x7b", "qwen1.5-moe-a2.7b"]
    assert [(s.num_experts, s.top_k, s.hidden, s.inter) for s in parse_shapes("4,2,32,32;mixtral-8x7b", tp=2)] == [
        (4, 2, 32, 16), (8, 2, 4096, 7168)]
    for shape in shapes:
        plan = sweep_plan(shape, [int(t) for t in DEFAULT_TOKENS.split(",")], small=False)
        for num_tokens, candidates in plan.items():
            assert candidates, (shape, num_tokens)
            for block_m, kind, tile in candidates:
                weight_tiles = 2 if kind == "gate_up" else 1
                assert tile.num_stages * (block_m + weight_tiles * tile.block_n) * tile.block_k * 2 <= SMEM_BYTES
                assert block_m * tile.block_n * weight_tiles <= 32768
        assert {bm for bm, _, _ in plan[1]} == {16}  # one pair per expert at most: the smallest row tile
        assert min(bm for bm, _, _ in plan[8192]) >= 64  # prefill: rows enough for big tiles
