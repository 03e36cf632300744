"""Sweep the paged-attention kernel's tiles (`LaunchConfig`) at the benchmark shapes, on the GPU.

For each shape: check every config against the fp32 reference (relative error < 1e-2), time it with
`do_bench_cudagraph` (kernel time, median), and print the best few beside the current default with
the bandwidth (decode) or FLOP rate (prefill) they reach. The defaults in
`kernels/paged_attention.py:launch_config` come from this table.

    python loadtests/tune_attention.py
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import triton.testing  # noqa: E402

from gpu_kernels import REL_ERR_BOUND, _rel_err, copy_bandwidth_gbps, make_paged  # noqa: E402
from splitserve.kernels.paged_attention import LaunchConfig, launch_config, paged_attention, paged_attention_ref  # noqa: E402

# (name, query_lens, seq_lens, Hq, Hkv, D)
SHAPES = [
    ("decode 1B", [1] * 256, [576] * 256, 32, 8, 64),
    ("decode 8B", [1] * 128, [1024] * 128, 32, 8, 128),
    ("decode 8B b256", [1] * 256, [1024] * 256, 32, 8, 128),
    ("prefill 1B", [512] * 32, [512] * 32, 32, 8, 64),
    ("prefill 8B", [512] * 32, [512] * 32, 32, 8, 128),
    # A retained agent turn: 528 new tokens over a 5k-token cached history (136 programs alone)
    ("retained turn 8B", [528], [5632], 32, 8, 128),
    # A later chunk of a long chunked prefill: 2048 tokens over 8k of context
    ("retained long chunk 8B", [2048], [8192], 32, 8, 128),
    ("retained turn 1B", [528], [5632], 32, 8, 64),
]


def candidates(decode: bool) -> list[LaunchConfig]:
    if decode:  # kv heads a program: 1, or 2 and 4 side by side (a longer contiguous read a key)
        grid = itertools.product([16], [32, 64], [2, 4], [2, 3], [1, 2, 4])
    else:
        grid = itertools.product([64, 128], [32, 64, 128], [4, 8], [1, 2, 3], [1])
    return [LaunchConfig(m, n, w, s, kv) for m, n, w, s, kv in grid]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="run only the shapes whose name contains this")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 2
    copy_gbps = copy_bandwidth_gbps()
    print(f"copy bandwidth {copy_gbps:.0f} GB/s (read + write)")
    for name, query_lens, seq_lens, hq, hkv, d in (s for s in SHAPES if args.only in s[0]):
        inp = make_paged(query_lens, seq_lens, hq, hkv, d)
        scale = d**-0.5
        hints = dict(max_query_len=max(query_lens), max_seq_len=max(seq_lens))
        ref = paged_attention_ref(*inp.args(q=inp.q.float()), scale, **hints)
        decode = max(query_lens) == 1
        kv_bytes = 2 * sum(seq_lens) * hkv * d * 2
        flops = 4 * sum(s - q + i + 1 for q, s in zip(query_lens, seq_lens) for i in range(q)) * hq * d
        default = launch_config(d, decode)
        results = []
        for config in candidates(decode):
            run = lambda c=config: paged_attention(*inp.args(), scale, config=c, **hints)  # noqa: E731
            try:
                err = _rel_err(run(), ref)
                us = triton.testing.do_bench_cudagraph(run, rep=30, return_mode="median") * 1e3
            except Exception as exc:  # noqa: BLE001 - out of shared memory and the like: skip the config
                print(f"  {name} {config}: {type(exc).__name__}")
                continue
            if err > REL_ERR_BOUND:
                print(f"  {name} {config}: WRONG rel err {err:.2e}")
                continue
            results.append((us, config, err))
        results.sort(key=lambda r: r[0])
        base = next((r for r in results if r[1] == default), None)
        print(f"\n== {name}: B={len(seq_lens)} q={max(query_lens)} ctx={max(seq_lens)} Hq={hq} Hkv={hkv} D={d}")
        print(f"{'config (block_m, block_n, warps, stages, kv heads)':52s} {'us':>8s} {'rate':>14s} {'vs default':>10s}")
        for us, config, err in results[:5] + ([base] if base and base not in results[:5] else []):
            rate = (f"{kv_bytes / (us * 1e-6) / 1e9 / copy_gbps * 100:5.1f}% of copy" if decode
                    else f"{flops / (us * 1e-6) / 1e12:6.1f} TFLOP/s")
            tag = " (default)" if config == default else ""
            ratio = f"{base[0] / us:.2f}x" if base else "-"
            tiles = (config.block_m, config.block_n, config.num_warps, config.num_stages, config.kv_heads)
            print(f"{tiles!s:52s} {us:8.1f} {rate:>14s} {ratio:>10s}{tag}")
        print_splits(inp, scale, hints, ref, flops)
    return 0


def print_splits(inp, scale: float, hints: dict, ref: torch.Tensor, flops: int) -> None:
    """The default tiles with the key range split as `_choose_num_splits` picks, and unsplit."""
    for label, splits in (("no split", 1), ("default split", None)):
        run = lambda n=splits: paged_attention(*inp.args(), scale, num_splits=n, **hints)  # noqa: E731
        err = _rel_err(run(), ref)
        us = triton.testing.do_bench_cudagraph(run, rep=30, return_mode="median") * 1e3
        print(f"  default tiles, {label:13s}: {us:8.1f} us {flops / (us * 1e-6) / 1e12:6.1f} TFLOP/s (rel err {err:.1e})")


if __name__ == "__main__":
    raise SystemExit(main())
