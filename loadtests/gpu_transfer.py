"""KV transfer between two processes on GPUs: a prefill process holds blocks of a CUDA KV pool, a
decode process loads them through the real `KVConnector` (ZMQ control + UCX data), and we check
bit-exactness and report GB/s against the same GPU's measured copy rate.

    UCX_TLS is set per run (default tcp,cuda_copy,cuda_ipc: CUDA IPC between processes on one node)
    python loadtests/gpu_transfer.py --blocks 256 --layout llama-3.1-8b [--decode-device cuda:1]

Layout: kv_cache[num_blocks, num_layers, 2, block_size, Hkv, D] bf16, so one block of the 8B shape
is 32 x 2 x 16 x 8 x 128 x 2 B = 2 MiB. Runs: `contiguous` (one run of adjacent blocks on both
sides: one message) and `scattered` (every other block: one message per block).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

LAYOUTS = {"llama-3.1-8b": (32, 8, 128), "llama-3.2-1b": (16, 8, 64)}
BLOCK_SIZE = 16


def _pool(args, device: str, seed: int):
    import torch

    layers, heads, dim = LAYOUTS[args.layout]
    gen = torch.Generator(device=device).manual_seed(seed)
    pool = torch.randn(args.pool_blocks, layers, 2, BLOCK_SIZE, heads, dim, device=device, dtype=torch.float32,
                       generator=gen).to(torch.bfloat16)
    torch.cuda.synchronize(device)
    return pool


def _config(args, role: str):
    from splitserve.shared.transfer.config import TransferConfig

    return TransferConfig(role=role, backend="ucx", ucx_tls=args.ucx_tls, timeout_s=120.0, lease_s=300.0,
                          model_id=args.layout)


def prefill_proc(args, requests, handles, done):
    import torch

    from splitserve.shared.transfer.connector import KVConnector

    torch.cuda.set_device(args.prefill_device)
    pool = _pool(args, args.prefill_device, seed=1)
    connector = KVConnector(pool, _config(args, "prefill"))
    while True:
        item = requests.get()
        if item is None:
            break
        name, block_ids = item
        handles.put(connector.hold(name, block_ids, len(block_ids) * BLOCK_SIZE).to_dict())
    done.wait(300)
    connector.close()


def decode_main(args) -> list[tuple[str, float, float, bool]]:
    import torch

    from splitserve.shared.transfer.connector import KVConnector
    from splitserve.shared.transfer.handle import KvHandle

    ctx = mp.get_context("spawn")
    requests, handles, done = ctx.Queue(), ctx.Queue(), ctx.Event()
    prefill = ctx.Process(target=prefill_proc, args=(args, requests, handles, done), daemon=True)
    prefill.start()
    torch.cuda.set_device(args.decode_device)
    pool = torch.zeros_like(_pool(args, args.decode_device, seed=2))
    connector = KVConnector(pool, _config(args, "decode"))
    src_expected = _pool(args, args.decode_device, seed=1) if args.prefill_device == args.decode_device else None
    n = args.blocks
    patterns = {
        "contiguous": (list(range(0, n)), list(range(n, 2 * n))),
        "scattered": (list(range(0, 2 * n, 2)), list(range(1, 2 * n, 2))),
    }
    results = []
    for rep in range(args.repeats + 1):  # first round warms connections / IPC handle caches
        for name, (src, dst) in patterns.items():
            rid = f"{name}-{rep}"
            requests.put((rid, src))
            handle = KvHandle.from_dict(handles.get(timeout=120))
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            connector.start_load(rid, handle, dst)
            while True:
                events = connector.poll()
                if rid in events.loaded or any(r == rid for r, _ in events.load_failed):
                    break
                time.sleep(0.0002)
            torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
            ok = rid in events.loaded
            exact = ok and (src_expected is None or torch.equal(pool[dst], src_expected[src]))
            if rep > 0:
                results.append((name, elapsed, len(src) * pool[0].numel() * pool.element_size(), exact))
    requests.put(None)
    done.set()
    prefill.join(60)
    connector.close()
    return results


def copy_rate(device: str, nbytes: int) -> float:
    """Payload bytes/s of an on-device copy of `nbytes` (the same-GPU ceiling for one transfer)."""
    import torch
    import triton.testing

    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=20, rep=200, return_mode="median")
    return nbytes / (ms * 1e-3)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layout", default="llama-3.1-8b", choices=sorted(LAYOUTS))
    parser.add_argument("--blocks", type=int, default=256)
    parser.add_argument("--pool-blocks", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefill-device", default="cuda:0")
    parser.add_argument("--decode-device", default="cuda:0")
    parser.add_argument("--ucx-tls", default="tcp,cuda_copy,cuda_ipc")
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(processName)s %(name)s: %(message)s")
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    results = decode_main(args)
    payload = results[0][2]
    peak = copy_rate(args.decode_device, payload)
    print(f"\nKV transfer {args.prefill_device} -> {args.decode_device}, UCX_TLS={args.ucx_tls}, layout {args.layout}, "
          f"{args.blocks} blocks = {payload / 2**20:.0f} MiB per transfer")
    print(f"same-GPU copy of the payload: {peak / 1e9:.0f} GB/s")
    print(f"{'pattern':12s} {'ms':>8s} {'GB/s':>8s} {'% copy':>7s} {'bit-exact':>9s}")
    for name in ("contiguous", "scattered"):
        rows = [r for r in results if r[0] == name]
        ms = sorted(r[1] for r in rows)[len(rows) // 2] * 1e3
        rate = payload / (ms * 1e-3)
        print(f"{name:12s} {ms:8.2f} {rate / 1e9:8.1f} {100 * rate / peak:6.0f}% {str(all(r[3] for r in rows)):>9s}")
    return 0 if all(r[3] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
