"""KV transfer between two processes on GPUs: a prefill process holds blocks of a CUDA KV pool, a
decode process loads them through the real `TransferConnector` (ZMQ control + UCX or NCCL data), and we
check bit-exactness and report GB/s against the link's measured peak: the same GPU's copy rate
when both processes share one GPU, the measured device-to-device copy (NVLink P2P) when they are
on two.

    UCX_TLS is set per run (default tcp,cuda_copy,cuda_ipc: CUDA IPC between processes on one node)
    python loadtests/gpu_transfer.py --blocks 256 --layout llama-3.1-8b [--decode-device cuda:1]
    python loadtests/gpu_transfer.py --decode-device cuda:1 --backend nccl     # two GPUs only
    python loadtests/gpu_transfer.py --prefill-device cpu --decode-device cpu --blocks 4 --pool-blocks 16
                                                  # CPU smoke run (UCX over TCP, or gloo for nccl)

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


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _use(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.set_device(device)


def _pool(args, device: str, seed: int):
    import torch

    layers, heads, dim = LAYOUTS[args.layout]
    gen = torch.Generator(device=device).manual_seed(seed)
    pool = torch.randn(args.pool_blocks, layers, 2, BLOCK_SIZE, heads, dim, device=device, dtype=torch.float32,
                       generator=gen).to(torch.bfloat16)
    _sync(device)
    return pool


def _config(args, role: str):
    from splitserve.shared.transfer.config import TransferConfig

    nccl = {}
    if args.backend == "nccl":
        nccl = dict(nccl_init_method=args.nccl_init_method, nccl_rank=0 if role == "prefill" else 1, nccl_world_size=2)
    return TransferConfig(role=role, backend=args.backend, ucx_tls=args.ucx_tls, timeout_s=120.0, lease_s=300.0,
                          model_id=args.layout, **nccl)


def prefill_proc(args, requests, handles, done):
    import torch

    from splitserve.shared.transfer.connector import TransferConnector

    _use(args.prefill_device)
    pool = _pool(args, args.prefill_device, seed=1)
    connector = TransferConnector(pool, _config(args, "prefill"))
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

    from splitserve.shared.transfer.connector import TransferConnector
    from splitserve.shared.transfer.handle import KvHandle

    ctx = mp.get_context("spawn")
    requests, handles, done = ctx.Queue(), ctx.Queue(), ctx.Event()
    prefill = ctx.Process(target=prefill_proc, args=(args, requests, handles, done), daemon=True)
    prefill.start()
    _use(args.decode_device)
    pool = torch.zeros_like(_pool(args, args.decode_device, seed=2))
    connector = TransferConnector(pool, _config(args, "decode"))
    # The prefill's pool, rebuilt here on the prefill's device (same generator, same numbers) and
    # brought over: what every loaded block must equal, bit for bit.
    src_expected = _pool(args, args.prefill_device, seed=1).to(args.decode_device)
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
            _sync(args.decode_device)
            t0 = time.perf_counter()
            connector.start_load(rid, handle, dst)
            while True:
                events = connector.poll()
                if rid in events.loaded or any(r == rid for r, _ in events.load_failed):
                    break
                time.sleep(0.0002)
            _sync(args.decode_device)
            elapsed = time.perf_counter() - t0
            ok = rid in events.loaded
            exact = ok and torch.equal(pool[dst], src_expected[src])
            if rep > 0:
                results.append((name, elapsed, len(src) * pool[0].numel() * pool.element_size(), exact))
    requests.put(None)
    done.set()
    prefill.join(60)
    connector.close()
    return results


def link_rate(src_device: str, dst_device: str, nbytes: int) -> float:
    """Payload bytes/s of one copy of `nbytes` from `src_device` to `dst_device`: the same GPU's copy
    rate, or over the link between two GPUs (NVLink P2P where the GPUs have it). The ceiling for one
    transfer."""
    import torch

    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=src_device).normal_()
    dst = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=dst_device)
    if src_device.startswith("cuda") and dst_device.startswith("cuda"):
        import triton.testing

        with torch.cuda.device(dst_device):
            ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=20, rep=200, return_mode="median")
        return nbytes / (ms * 1e-3)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(dst_device)
        times.append(time.perf_counter() - t0)
    return nbytes / sorted(times)[len(times) // 2]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layout", default="llama-3.1-8b", choices=sorted(LAYOUTS))
    parser.add_argument("--blocks", type=int, default=256)
    parser.add_argument("--pool-blocks", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefill-device", default="cuda:0")
    parser.add_argument("--decode-device", default="cuda:0")
    parser.add_argument("--ucx-tls", default="tcp,cuda_copy,cuda_ipc")
    parser.add_argument("--backend", default="ucx", choices=("ucx", "nccl"),
                        help="data plane; nccl needs two different GPUs (or cpu: gloo)")
    args = parser.parse_args()
    if args.backend == "nccl" and args.prefill_device == args.decode_device and args.decode_device.startswith("cuda"):
        parser.error("the nccl backend needs the two ranks on different GPUs (NCCL refuses a GPU shared by "
                     "two ranks); use --decode-device cuda:1, or --backend ucx on one GPU")
    if args.backend == "nccl":
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            args.nccl_init_method = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    import logging

    logging.basicConfig(level=logging.INFO, format="%(processName)s %(name)s: %(message)s")
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    results = decode_main(args)
    payload = results[0][2]
    peak = link_rate(args.prefill_device, args.decode_device, payload)
    data_plane = f"UCX_TLS={args.ucx_tls}" if args.backend == "ucx" else "NCCL (gloo on CPU)"
    print(f"\nKV transfer {args.prefill_device} -> {args.decode_device}, {data_plane}, layout {args.layout}, "
          f"{args.blocks} blocks = {payload / 2**20:.2f} MiB per transfer")
    link = "same-device copy" if args.prefill_device == args.decode_device else "device-to-device copy"
    print(f"{link} of the payload (the link's measured peak): {peak / 1e9:.1f} GB/s")
    print(f"{'pattern':12s} {'ms':>8s} {'GB/s':>8s} {'% peak':>7s} {'bit-exact':>9s}")
    for name in ("contiguous", "scattered"):
        rows = [r for r in results if r[0] == name]
        ms = sorted(r[1] for r in rows)[len(rows) // 2] * 1e3
        rate = payload / (ms * 1e-3)
        print(f"{name:12s} {ms:8.2f} {rate / 1e9:8.1f} {100 * rate / peak:6.0f}% {str(all(r[3] for r in rows)):>9s}")
    return 0 if all(r[3] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
