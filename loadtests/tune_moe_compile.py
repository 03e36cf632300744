"""tune_moe.py's compile workers: the sweep's kernels compiled into Triton's disk cache ahead, in
processes of their own (compiling is CPU-bound and the sweep's GPU timing is not), so the sweep
finds them built. Any kernel a worker did not build compiles on first use instead."""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor

import torch

from splitserve.kernels.fused_moe import down_rows, gate_up_rows
from splitserve.kernels.moe_config import MoeTile


def _compile_chunk(shape, dtype_name: str, jobs: list[tuple[int, str, MoeTile]]) -> int:
    """In a worker: compile each (block_m, kind, tile) into Triton's disk cache, launching nothing.
    Tensors of one expert give the kernels the shape's constexprs and strides."""
    dtype, dev = getattr(torch, dtype_name), "cuda"
    x = torch.empty(1, shape.hidden, dtype=dtype, device=dev)
    w13 = torch.empty(1, 2 * shape.inter, shape.hidden, dtype=dtype, device=dev)
    w2 = torch.empty(1, shape.hidden, shape.inter, dtype=dtype, device=dev)
    ints = torch.empty(128, dtype=torch.int32, device=dev)
    inter_rows = torch.empty(128, shape.inter, dtype=dtype, device=dev)
    pair_out = torch.empty(shape.top_k, shape.hidden, dtype=dtype, device=dev)
    weights = torch.empty(shape.top_k, dtype=torch.float32, device=dev)
    done = 0
    for block_m, kind, tile in jobs:
        try:
            if kind == "gate_up":
                gate_up_rows(inter_rows, x, w13, ints, ints, shape.top_k, "silu", block_m, tile, compile_only=True)
            else:
                down_rows(pair_out, inter_rows, w2, weights, ints, ints, block_m, tile, compile_only=True)
            done += 1
        except Exception:  # noqa: BLE001 - the sweep skips what does not build
            pass
    return done


def submit_compiles(pool: ProcessPoolExecutor, shape, plan: dict, dtype: torch.dtype, workers: int) -> list:
    jobs = sorted({job for candidates in plan.values() for job in candidates}, key=str)
    dtype_name = str(dtype).removeprefix("torch.")
    batches = min(len(jobs), workers * 4)  # small batches: a budget-cut run waits little for the last
    return [pool.submit(_compile_chunk, shape, dtype_name, jobs[i::batches]) for i in range(batches)]


def wait_for_compiles(shape, futures: list) -> None:
    """Wait for a shape's compile batches; a batch whose worker failed is compiled by the sweep."""
    start, built, failed = time.monotonic(), 0, 0
    for future in futures:
        try:
            built += future.result()
        except Exception as exc:  # noqa: BLE001 - a dead worker costs time, not the run
            failed += 1
            print(f"  compile batch failed ({type(exc).__name__}: {exc}); its kernels compile on first use")
    print(f"{shape.name}: {built} kernels compiled ahead ({failed} batches failed), waited {time.monotonic() - start:.1f} s")
