"""GPU check and timing of every splitserve Triton kernel at Llama shapes (bf16), and the fused MoE
kernel at Qwen3-30B-A3B and Mixtral-8x7B shapes against a dense grouped-GEMM floor.

Each case builds fresh random bf16 inputs, runs the Triton kernel, and compares it with the torch
reference computed in fp32 from the same bf16 inputs: relative error `||out - ref|| / ||ref||`
must stay under 1e-2 (KV writes must be exact). Then it times the kernel with
`triton.testing.do_bench` (median, includes the Python wrapper) and `do_bench_cudagraph` (median,
kernel time without launch overhead), and relates bytes moved to a device-to-device copy measured
in the same run. Decode attention is also timed against torch SDPA on pre-gathered dense K/V.

    pip install --no-deps --no-build-isolation -e . && python loadtests/gpu_kernels.py

Exits 1 if any check fails, 2 without CUDA.
"""

from __future__ import annotations

import itertools
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

REL_ERR_BOUND = 1e-2
BF16 = torch.bfloat16
BLOCK_SIZE = 16
DEVICE = "cuda"


@dataclass
class Row:
    kernel: str
    shape: str
    rel_err: float | None  # None for peers that are not checked
    time_us: float  # do_bench median, wrapper included
    graph_us: float  # do_bench_cudagraph median, kernel only
    bytes_moved: int
    flops: float = 0.0
    note: str = ""


def _bench(fn) -> tuple[float, float]:
    import triton.testing

    eager_ms = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
    try:
        graph_ms = triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
    except Exception as exc:  # noqa: BLE001 - report, keep benchmarking
        print(f"  (cuda graph timing failed: {type(exc).__name__}: {exc})")
        graph_ms = float("nan")
    return eager_ms * 1e3, graph_ms * 1e3


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def copy_bandwidth_gbps() -> float:
    import triton.testing

    src = torch.randn(256 * 2**20, device=DEVICE)  # 1 GiB
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=5, rep=50, return_mode="median")
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9  # read + write


# ---------------------------------------------------------------- paged attention


@dataclass
class PagedInputs:
    q: torch.Tensor
    kv_cache: torch.Tensor  # [num_blocks, 2 layers, 2, bs, Hkv, D]
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor

    def args(self, q=None):
        return (self.q if q is None else q, self.kv_cache[:, 1, 0], self.kv_cache[:, 1, 1],
                self.query_start_loc, self.seq_lens, self.block_tables)


def make_paged(query_lens: list[int], seq_lens: list[int], hq: int, hkv: int, d: int) -> PagedInputs:
    blocks = [math.ceil(s / BLOCK_SIZE) for s in seq_lens]
    num_blocks = sum(blocks) + 8
    kv_cache = torch.randn(num_blocks, 2, 2, BLOCK_SIZE, hkv, d, device=DEVICE, dtype=BF16)
    ids = torch.randperm(num_blocks, device=DEVICE)[: sum(blocks)].to(torch.int32)  # shuffled blocks
    table = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32, device=DEVICE)
    start = 0
    for b, n in enumerate(blocks):
        table[b, :n] = ids[start : start + n]
        start += n
    qsl = torch.tensor([0, *itertools.accumulate(query_lens)], dtype=torch.int32, device=DEVICE)
    q = torch.randn(sum(query_lens), hq, d, device=DEVICE, dtype=BF16)
    return PagedInputs(q, kv_cache, qsl, torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), table)


def attention_case(name, query_lens, seq_lens, hq, hkv, d, window=None, num_splits=None) -> Row:
    from splitserve.kernels.paged_attention import paged_attention, paged_attention_ref

    inp = make_paged(query_lens, seq_lens, hq, hkv, d)
    scale = d**-0.5
    hints = dict(max_query_len=max(query_lens), max_seq_len=max(seq_lens))
    run = lambda: paged_attention(*inp.args(), scale, window, num_splits=num_splits, **hints)  # noqa: E731
    out = run()
    ref = paged_attention_ref(*inp.args(q=inp.q.float()), scale, window)  # fp32 math on bf16 inputs
    eager_us, graph_us = _bench(run)
    kv_tokens = sum(min(s, s if window is None else window + q - 1) for q, s in zip(query_lens, seq_lens))
    bytes_moved = 2 * kv_tokens * hkv * d * 2 + 2 * inp.q.numel() * 2
    visible = sum(min(p + 1, window or p + 1) for q, s in zip(query_lens, seq_lens) for p in range(s - q, s))
    flops = 4 * visible * hq * d  # QK^T and PV over the visible (causal, windowed) keys
    shape = f"B={len(seq_lens)} q={max(query_lens)} ctx={max(seq_lens)} Hq={hq} Hkv={hkv} D={d}"
    return Row(name, shape, _rel_err(out, ref), eager_us, graph_us, bytes_moved, flops)


def sdpa_peer(batch: int, ctx: int, hq: int, hkv: int, d: int, expand_kv: bool) -> Row:
    """torch SDPA decode on dense K/V gathered beforehand (gather not timed); `expand_kv` repeats
    K/V to Hq heads (flash backend, 4x the bytes) instead of `enable_gqa`."""
    q = torch.randn(batch, hq, 1, d, device=DEVICE, dtype=BF16)
    k = torch.randn(batch, hkv, ctx, d, device=DEVICE, dtype=BF16)
    v = torch.randn_like(k)
    if expand_kv:
        k, v = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    run = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=not expand_kv)  # noqa: E731
    run()
    eager_us, graph_us = _bench(run)
    bytes_moved = 2 * k.numel() * 2 + 2 * q.numel() * 2
    note = "dense K/V repeated to Hq heads" if expand_kv else "dense K/V, enable_gqa"
    return Row("torch SDPA (peer)", f"B={batch} q=1 ctx={ctx} Hq={hq} Hkv={hkv} D={d}", None,
               eager_us, graph_us, bytes_moved, note=note)


# ---------------------------------------------------------------- elementwise kernels


def kv_write_case(num_tokens: int, hkv: int, d: int) -> Row:
    from splitserve.kernels.kv_cache_write import write_kv_cache, write_kv_cache_ref

    num_blocks = math.ceil(num_tokens / BLOCK_SIZE) + 4
    pool = torch.randn(num_blocks, 2, 2, BLOCK_SIZE, hkv, d, device=DEVICE, dtype=BF16)
    expected = pool.clone()
    k = torch.randn(num_tokens, hkv, d, device=DEVICE, dtype=BF16)
    v = torch.randn_like(k)
    slots = torch.randperm(num_blocks * BLOCK_SIZE, device=DEVICE)[:num_tokens]
    slots[::7] = -1  # padding tokens
    run = lambda: write_kv_cache(k, v, pool[:, 1, 0], pool[:, 1, 1], slots)  # noqa: E731
    run()
    write_kv_cache_ref(k, v, expected[:, 1, 0], expected[:, 1, 1], slots)
    err = 0.0 if torch.equal(pool, expected) else float("inf")
    eager_us, graph_us = _bench(run)
    written = int((slots >= 0).sum())
    return Row("write_kv_cache", f"T={num_tokens} Hkv={hkv} D={d}", err, eager_us, graph_us, 4 * written * hkv * d * 2)


def rms_case(num_tokens: int, hidden: int, fused: bool) -> Row:
    from splitserve.kernels import rms_norm as rn

    x = torch.randn(num_tokens, hidden, device=DEVICE, dtype=BF16)
    residual = torch.randn_like(x)
    w = (1 + 0.1 * torch.randn(hidden, device=DEVICE)).to(BF16)
    if fused:
        run = lambda: rn.fused_add_rms_norm(x, residual, w, 1e-5)  # noqa: E731
        out, new_res = run()
        ref, ref_res = rn.fused_add_rms_norm_ref(x.float(), residual.float(), w.float(), 1e-5)
        err = max(_rel_err(out, ref), _rel_err(new_res, ref_res))
        name, nbytes = "fused_add_rms_norm", 4 * x.numel() * 2
    else:
        run = lambda: rn.rms_norm(x, w, 1e-5)  # noqa: E731
        err = _rel_err(run(), rn.rms_norm_ref(x.float(), w.float(), 1e-5))
        name, nbytes = "rms_norm", 2 * x.numel() * 2
    eager_us, graph_us = _bench(run)
    return Row(name, f"T={num_tokens} H={hidden}", err, eager_us, graph_us, nbytes)


def rotary_case(num_tokens: int, hq: int, hkv: int, d: int) -> Row:
    from splitserve.kernels.rotary import compute_cos_sin_cache, rotary_embedding, rotary_embedding_ref

    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, d, 2, device=DEVICE).float() / d))
    cache = compute_cos_sin_cache(inv_freq, 131072)
    qkv = torch.randn(num_tokens, hq + 2 * hkv, d, device=DEVICE, dtype=BF16)  # q, k as views of qkv
    q, k = qkv[:, :hq], qkv[:, hq : hq + hkv]
    positions = torch.randint(0, 131072, (num_tokens,), device=DEVICE)
    run = lambda: rotary_embedding(positions, q, k, cache)  # noqa: E731
    q_out, k_out = run()
    q_ref, k_ref = rotary_embedding_ref(positions, q.float(), k.float(), cache)
    err = max(_rel_err(q_out, q_ref), _rel_err(k_out, k_ref))
    eager_us, graph_us = _bench(run)
    nbytes = 2 * num_tokens * (hq + hkv) * d * 2 + num_tokens * d * 4
    return Row("rotary_embedding", f"T={num_tokens} Hq={hq} Hkv={hkv} D={d}", err, eager_us, graph_us, nbytes)


def silu_case(num_tokens: int, inter: int) -> Row:
    from splitserve.kernels.activation import silu_and_mul, silu_and_mul_ref

    x = torch.randn(num_tokens, 2 * inter, device=DEVICE, dtype=BF16)
    run = lambda: silu_and_mul(x)  # noqa: E731
    err = _rel_err(run(), silu_and_mul_ref(x.float()))
    eager_us, graph_us = _bench(run)
    return Row("silu_and_mul", f"T={num_tokens} I={inter}", err, eager_us, graph_us, 3 * num_tokens * inter * 2)


def _routing(num_tokens: int, num_experts: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.randn(num_tokens, num_experts, device=DEVICE)
    weights, ids = torch.topk(torch.softmax(logits, -1), top_k, dim=-1)
    return weights / weights.sum(-1, keepdim=True), ids


def _moe_weights(num_experts: int, hidden: int, inter: int) -> tuple[torch.Tensor, torch.Tensor]:
    w13 = torch.randn(num_experts, 2 * inter, hidden, device=DEVICE, dtype=BF16) * hidden**-0.5
    w2 = torch.randn(num_experts, hidden, inter, device=DEVICE, dtype=BF16) * inter**-0.5
    return w13, w2


def _moe_bytes_flops(num_tokens, num_experts, top_k, hidden, inter, touched) -> tuple[int, float]:
    weight_bytes = int(touched * 3 * hidden * inter * 2)
    activation_bytes = num_tokens * hidden * 2 * 2 + num_tokens * top_k * (inter + hidden) * 2 * 2
    return weight_bytes + activation_bytes, 2.0 * num_tokens * top_k * 3 * hidden * inter


def moe_case(num_tokens: int, num_experts: int, top_k: int, hidden: int, inter: int) -> Row:
    """The fused MoE kernel at a real routing; bytes count the experts this routing touches."""
    from splitserve.kernels.fused_moe import fused_moe, fused_moe_ref

    x = torch.randn(num_tokens, hidden, device=DEVICE, dtype=BF16)
    w13, w2 = _moe_weights(num_experts, hidden, inter)
    weights, ids = _routing(num_tokens, num_experts, top_k)
    run = lambda: fused_moe(x, w13, w2, weights, ids)  # noqa: E731
    err = _rel_err(run(), fused_moe_ref(x.float(), w13.float(), w2.float(), weights, ids))
    eager_us, graph_us = _bench(run)
    touched = torch.unique(ids).numel()
    moved, flops = _moe_bytes_flops(num_tokens, num_experts, top_k, hidden, inter, touched)
    return Row("fused_moe", f"T={num_tokens} E={num_experts} k={top_k} H={hidden} I={inter}", err, eager_us,
               graph_us, moved, flops, note=f"{touched} experts touched")


def moe_dense_floor(num_tokens: int, num_experts: int, top_k: int, hidden: int, inter: int) -> Row:
    """The floor the fused kernel is held against: the same GEMMs with the tokens already grouped and
    perfectly balanced (T*k/E rows per expert, at least one), as two batched cuBLAS GEMMs and the
    activation, with no routing, sorting, gathering or combining."""
    from splitserve.kernels.activation import silu_and_mul

    touched = min(num_experts, num_tokens * top_k)
    rows = max(1, num_tokens * top_k // touched)
    x = torch.randn(touched, rows, hidden, device=DEVICE, dtype=BF16)
    w13, w2 = _moe_weights(touched, hidden, inter)

    def run():
        gate_up = torch.bmm(x, w13.transpose(1, 2)).view(touched * rows, 2 * inter)
        return torch.bmm(silu_and_mul(gate_up).view(touched, rows, inter), w2.transpose(1, 2))

    eager_us, graph_us = _bench(run)
    moved, flops = _moe_bytes_flops(num_tokens, num_experts, top_k, hidden, inter, touched)
    return Row("moe dense bmm floor", f"T={num_tokens} E={num_experts} k={top_k} H={hidden} I={inter}", None,
               eager_us, graph_us, moved, flops, note=f"{rows} rows x {touched} experts, balanced")


def wrapper_overhead() -> None:
    """Host time per call (no sync) of the attention wrapper and its parts, and of a one-line kernel."""
    import time

    from splitserve.kernels import paged_attention as pa
    from splitserve.kernels.rms_norm import rms_norm

    inp = make_paged([1], [4096], 32, 8, 128)
    x, w = torch.randn(1, 4096, device=DEVICE, dtype=BF16), torch.randn(4096, device=DEVICE, dtype=BF16)
    probes = {
        "paged_attention B=1 auto split": lambda: pa.paged_attention(*inp.args(), 0.1, max_query_len=1, max_seq_len=4096),
        "paged_attention B=1 num_splits=1": lambda: pa.paged_attention(*inp.args(), 0.1, num_splits=1),
        "_check_inputs": lambda: pa._check_inputs(*inp.args(), None),
        "torch.empty_like(q)": lambda: torch.empty_like(inp.q),
        "rms_norm T=1 (one small kernel)": lambda: rms_norm(x, w, 1e-5),
    }
    for name, fn in probes.items():
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(200):
            fn()
        host_us = (time.perf_counter() - start) / 200 * 1e6
        torch.cuda.synchronize()
        print(f"host overhead  {name:36} {host_us:8.1f} us/call")


# ---------------------------------------------------------------- driver


def cases():
    llama8b, llama1b = (32, 8, 128), (32, 8, 64)
    for batch, ctx in ((1, 4096), (32, 4096), (128, 2048), (256, 1024)):
        yield lambda b=batch, c=ctx: attention_case("paged_attn decode", [1] * b, [c] * b, *llama8b)
        yield lambda b=batch, c=ctx: sdpa_peer(b, c, *llama8b, expand_kv=False)
        yield lambda b=batch, c=ctx: sdpa_peer(b, c, *llama8b, expand_kv=True)
    yield lambda: attention_case("paged_attn decode nosplit", [1], [4096], *llama8b, num_splits=1)
    yield lambda: attention_case("paged_attn decode nosplit", [1] * 32, [4096] * 32, *llama8b, num_splits=1)
    yield lambda: attention_case("paged_attn decode 1B", [1] * 64, [2048] * 64, *llama1b)
    ragged = torch.randint(100, 4097, (16,), generator=torch.Generator().manual_seed(1)).tolist()
    yield lambda: attention_case("paged_attn decode ragged", [1] * 16, ragged, *llama8b)
    yield lambda: attention_case("paged_attn prefill chunk", [2048], [4096], *llama8b)
    yield lambda: attention_case("paged_attn prefill chunk 1B", [2048], [4096], *llama1b)
    yield lambda: attention_case("paged_attn mixed", [512] + [1] * 63, [1024] + [2048] * 63, *llama8b)
    yield lambda: attention_case("paged_attn window=1024", [1024, 1, 1], [3072, 4096, 500], *llama8b, window=1024)
    yield lambda: kv_write_case(256, 8, 128)
    yield lambda: kv_write_case(8192, 8, 128)
    yield lambda: rms_case(8192, 4096, fused=False)
    yield lambda: rms_case(8192, 4096, fused=True)
    yield lambda: rms_case(256, 2048, fused=True)
    yield lambda: rotary_case(8192, 32, 8, 128)
    yield lambda: rotary_case(8192, 32, 8, 64)
    yield lambda: silu_case(8192, 14336)
    yield lambda: silu_case(256, 8192)
    qwen3_moe, mixtral = (128, 8, 2048, 768), (8, 2, 4096, 14336)  # experts, per token, hidden, expert inter
    for num_tokens in (1, 64, 256, 8192):
        yield lambda t=num_tokens: moe_case(t, *qwen3_moe)
        yield lambda t=num_tokens: moe_dense_floor(t, *qwen3_moe)
    for num_tokens in (64, 4096):
        yield lambda t=num_tokens: moe_case(t, *mixtral)
        yield lambda t=num_tokens: moe_dense_floor(t, *mixtral)


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_kernels.py needs a CUDA device")
        return 2
    torch.manual_seed(0)
    copy_gbps = copy_bandwidth_gbps()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  copy bandwidth {copy_gbps:.0f} GB/s")
    header = f"{'kernel':28} {'shape':44} {'rel_err':>9} {'time_us':>9} {'graph_us':>9} {'GB/s':>7} {'%copy':>6} {'TFLOP/s':>8}  note"
    print(header)
    failures = 0
    for case in cases():
        try:
            row = case()
        except Exception as exc:  # noqa: BLE001 - one broken case must not hide the others
            failures += 1
            print(f"FAILED to run a case: {type(exc).__name__}: {exc}")
            continue
        kernel_us = row.graph_us if row.graph_us == row.graph_us else row.time_us
        gbps = row.bytes_moved / (kernel_us * 1e-6) / 1e9
        tflops = row.flops / (kernel_us * 1e-6) / 1e12 if row.flops else float("nan")
        bad = row.rel_err is not None and not row.rel_err <= REL_ERR_BOUND  # NaN fails too
        failures += bad
        err_text = "-" if row.rel_err is None else f"{row.rel_err:.2e}"
        print(f"{row.kernel:28} {row.shape:44} {err_text:>9} {row.time_us:9.1f} {row.graph_us:9.1f} "
              f"{gbps:7.0f} {100 * gbps / copy_gbps:5.0f}% {tflops:8.1f}  {'CHECK FAILED ' if bad else ''}{row.note}",
              flush=True)
    try:
        wrapper_overhead()
    except Exception as exc:  # noqa: BLE001 - a probe failure is not a kernel check failure
        print(f"host overhead probe failed: {type(exc).__name__}: {exc}")
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
