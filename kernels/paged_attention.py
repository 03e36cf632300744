"""Paged attention over the block-major KV cache: varlen prefill chunks and decode in one call.

`paged_attention_ref` is the plain-torch oracle; the Triton kernel and its wrapper `paged_attention`
follow it. The CPU path, `paged_attention_cpu`, lives in `paged_attention_cpu.py`.

Layout. `k_cache`/`v_cache` are `[num_blocks, block_size, num_kv_heads, head_dim]` strided views of
the pool `kv_cache[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]`, so they are not
contiguous across blocks. Request `b` owns query rows `query_start_loc[b]:query_start_loc[b+1]` of
`q`; its keys are the first `seq_lens[b]` slots named by `block_tables[b]`. Query token `i` sits at
position `p = seq_lens[b] - q_len_b + i` and sees key positions `j <= p` (and `p - j < sliding_window`
when given; the kernel does not even read the blocks that lie wholly before the window). Query head
`h` reads kv head `h // (Hq // Hkv)`. With `logit_softcap` (Gemma 2) each score `s = scale * q.k` becomes
`cap * tanh(s / cap)` before the softmax.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch

from splitserve.kernels.triton_import import require_triton, tl, triton


def check_ragged_lengths(query_lens: list[int], seq_lens: list[int]) -> None:
    for b, (q_len, seq_len) in enumerate(zip(query_lens, seq_lens)):
        if q_len < 0 or q_len > seq_len:
            raise ValueError(f"request {b}: query length {q_len} must be in [0, seq_len={seq_len}]")


def softcap_scores(scores: torch.Tensor, logit_softcap: float | None) -> torch.Tensor:
    """`cap * tanh(scores / cap)`, or `scores` unchanged without a cap."""
    return scores if logit_softcap is None else torch.tanh(scores / logit_softcap) * logit_softcap


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    *,
    logit_softcap: float | None = None,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """Plain-torch paged attention, one request at a time, softmax in fp32. Returns `[T, Hq, D]`."""
    del max_query_len, max_seq_len  # host hints for the kernel's launch; the loop needs none
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    query_lens = [starts[b + 1] - starts[b] for b in range(len(lens))]
    check_ragged_lengths(query_lens, lens)
    out = torch.empty_like(q)
    for b, (q_len, seq_len) in enumerate(zip(query_lens, lens)):
        if q_len == 0:
            continue
        num_blocks = -(-seq_len // block_size)
        block_ids = block_tables[b, :num_blocks].to(device=k_cache.device, dtype=torch.long)
        # [num_blocks, block_size, Hkv, D] -> [seq_len, Hkv, D] -> [Hq, seq_len, D]
        k = k_cache[block_ids].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        v = v_cache[block_ids].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        k = k.transpose(0, 1).repeat_interleave(group, dim=0)
        v = v.transpose(0, 1).repeat_interleave(group, dim=0)
        q_b = q[starts[b] : starts[b + 1]].float().transpose(0, 1)  # [Hq, q_len, D]
        scores = softcap_scores(torch.matmul(q_b, k.transpose(1, 2)) * scale, logit_softcap)  # [Hq, q_len, seq_len]
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
        k_pos = torch.arange(seq_len, device=q.device)[None, :]
        visible = k_pos <= q_pos
        if sliding_window is not None:
            visible &= (q_pos - k_pos) < sliding_window
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[starts[b] : starts[b + 1]] = torch.matmul(probs, v).transpose(0, 1).to(q.dtype)
    return out


# ---------------------------------------------------------------- Triton kernel
#
# Grid: (query tiles, kv head groups, kv splits). A query tile is BLOCK_Q tokens of one request times
# the GROUP query heads that share a kv head, times the KV_HEADS kv heads of the program, flattened
# into BLOCK_M = BLOCK_Q * KV_HEADS * GROUP_PAD rows, so a K/V tile loaded once serves every head of
# its group. With KV_HEADS > 1 a K/V tile is KV_HEADS heads wide (COLS = KV_HEADS * HEAD_DIM_PAD
# columns, adjacent in the cache: one longer contiguous read a key), and each row's query is zero
# outside its own head's columns, so q.k sums its own head only; of p.v, a row keeps its own head's
# columns. The dots do KV_HEADS times the work, which decode, bound by reading K/V, has to spare.
# Tile ids are laid out so that request b's tiles start at `query_start_loc[b] // BLOCK_Q + b`;
# `T // BLOCK_Q + B` ids cover every request without a host-side pass over the query lengths, and
# ids past a request's last tile exit at once.
# With NUM_SPLITS > 1 each program covers a contiguous share of the tile's key range and writes its
# normalised partial output plus its log2-sum-exp; `_combine_splits_kernel` merges them.


@triton.jit
def _request_of_tile(query_start_loc_ptr, tile, num_reqs, BLOCK_Q: tl.constexpr):
    """The request whose tile range holds `tile`: the last b with qsl[b] // BLOCK_Q + b <= tile."""
    lo: tl.int32 = 0
    hi = num_reqs  # invariant: answer in [lo, hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        first_tile = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_tile <= tile:
            lo = mid
        else:
            hi = mid
    return lo


@triton.jit
def _tanh(x):
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)  # saturates to +-1 where exp over/underflows


@triton.jit(do_not_specialize=["num_reqs", "sliding_window", "logit_softcap", "stride_bt"])
def _paged_attention_kernel(
    out_ptr,  # NUM_SPLITS == 1: [T, Hq, D] in q's dtype; else partials [T, Hq, NUM_SPLITS, D] fp32
    lse_ptr,  # NUM_SPLITS > 1: [T, Hq, NUM_SPLITS] fp32 log2-sum-exp per split
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    block_tables_ptr,
    num_reqs,
    scale_log2,  # softmax scale * log2(e): scores live in the exp2 domain
    sliding_window,
    logit_softcap,  # USE_SOFTCAP: scores become cap * tanh(score / cap), in natural-log units
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    stride_ot, stride_oh, stride_os,
    stride_lt, stride_lh,
    BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    KV_HEADS: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BLOCK_Q * KV_HEADS * GROUP_PAD
    COLS: tl.constexpr = KV_HEADS * HEAD_DIM_PAD
    tile = tl.program_id(0)
    first_kv_head = tl.program_id(1) * KV_HEADS
    split = tl.program_id(2)

    req = _request_of_tile(query_start_loc_ptr, tile, num_reqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    q_tile_start = (tile - (q_start // BLOCK_Q + req)) * BLOCK_Q
    if q_tile_start >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    context_len = seq_len - q_len

    # Rows of the tile: token (q_tile_start + row // (KV_HEADS * GROUP_PAD)), then the program's kv
    # head (row // GROUP_PAD % KV_HEADS), then the head of its group (row % GROUP_PAD).
    rows = tl.arange(0, BLOCK_M)
    tok = q_tile_start + rows // (KV_HEADS * GROUP_PAD)
    row_kv = rows // GROUP_PAD % KV_HEADS
    head = (first_kv_head + row_kv) * GROUP + rows % GROUP_PAD
    row_ok = (tok < q_len) & (rows % GROUP_PAD < GROUP)
    # Columns: kv head (col // HEAD_DIM_PAD) of the program, dim (col % HEAD_DIM_PAD) of it.
    cols = tl.arange(0, COLS)
    col_kv = cols // HEAD_DIM_PAD
    offs_d = cols % HEAD_DIM_PAD
    d_ok = offs_d < HEAD_DIM
    own = (row_kv[:, None] == col_kv[None, :]) & row_ok[:, None] & d_ok[None, :]  # [BLOCK_M, COLS]
    tok64 = (q_start + tok).to(tl.int64)
    q_ptrs = q_ptr + tok64[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=own, other=0.0)  # [BLOCK_M, COLS]
    k_cols = (first_kv_head + col_kv) * stride_kh + offs_d  # [COLS] offsets within a key's slot
    v_cols = (first_kv_head + col_kv) * stride_vh + offs_d
    q_pos = context_len + tok  # absolute position of each row's token

    # Keys this tile can see: [kv_begin, kv_end), then this split's share of whole BLOCK_N tiles.
    kv_end = context_len + tl.minimum(q_tile_start + BLOCK_Q, q_len)
    kv_begin = 0
    if USE_WINDOW:
        kv_begin = tl.maximum(context_len + q_tile_start - sliding_window + 1, 0) // BLOCK_N * BLOCK_N
    tiles_per_split = tl.cdiv(tl.cdiv(kv_end - kv_begin, BLOCK_N), NUM_SPLITS)
    split_begin = kv_begin + split * tiles_per_split * BLOCK_N
    split_end = tl.minimum(split_begin + tiles_per_split * BLOCK_N, kv_end)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, COLS], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(split_begin, split_end, BLOCK_N):
        k_pos = start + offs_n
        k_ok = k_pos < split_end
        block_ids = tl.load(block_tables_ptr + req * stride_bt + k_pos // BLOCK_SIZE, mask=k_ok, other=0)
        block_ids = block_ids.to(tl.int64)  # the pool can exceed 2**31 elements
        in_block = k_pos % BLOCK_SIZE
        k_ptrs = k_cache_ptr + block_ids[None, :] * stride_kb + in_block[None, :] * stride_ks + k_cols[:, None]
        k = tl.load(k_ptrs, mask=k_ok[None, :] & d_ok[:, None], other=0.0)  # [COLS, BLOCK_N]
        scores = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
        if USE_SOFTCAP:  # cap in natural-log units: cap * tanh(s / cap), s = scores / log2(e)
            scores = logit_softcap * _tanh(scores / (logit_softcap * 1.4426950408889634)) * 1.4426950408889634
        visible = (k_pos[None, :] <= q_pos[:, None]) & k_ok[None, :]
        if USE_WINDOW:
            visible = visible & (q_pos[:, None] - k_pos[None, :] < sliding_window)
        scores = tl.where(visible, scores, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_ptrs = v_cache_ptr + block_ids[:, None] * stride_vb + in_block[:, None] * stride_vs + v_cols[None, :]
        v = tl.load(v_ptrs, mask=k_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, COLS]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = out_ptr + tok64[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    if NUM_SPLITS == 1:
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=own)
    else:
        tl.store(o_ptrs + split * stride_os, out, mask=own)
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
        tl.store(lse_ptr + tok64 * stride_lt + head * stride_lh + split, lse, mask=row_ok)


@triton.jit
def _combine_splits_kernel(
    out_ptr,  # [T, Hq, D]
    partial_ptr,  # [T, Hq, NUM_SPLITS, D] fp32, contiguous
    lse_ptr,  # [T, Hq, NUM_SPLITS] fp32, contiguous
    num_heads,
    stride_ot, stride_oh,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    row = tok * num_heads + head
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    s_ok = offs_s < NUM_SPLITS
    d_ok = offs_d < HEAD_DIM
    lse = tl.load(lse_ptr + row * NUM_SPLITS + offs_s, mask=s_ok, other=float("-inf"))
    # Every token sees itself, so at least one split has a finite log-sum-exp.
    weights = tl.exp2(lse - tl.max(lse, axis=0))  # [SPLITS_PAD]
    part_ptrs = partial_ptr + (row * NUM_SPLITS + offs_s[:, None]) * HEAD_DIM + offs_d[None, :]
    parts = tl.load(part_ptrs, mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    out = tl.sum(parts * weights[:, None], axis=0) / tl.sum(weights, axis=0)
    o_ptrs = out_ptr + tok * stride_ot + head * stride_oh + offs_d
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=d_ok)


# ---------------------------------------------------------------- wrapper

_LOG2E = 1.4426950408889634


def _check_inputs(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, sliding_window,
                  logit_softcap=None) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"expected q [T, Hq, D] and k_cache == v_cache [N, block_size, Hkv, D]; got q {tuple(q.shape)}, "
            f"k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}"
        )
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim or num_q_heads % num_kv_heads != 0:
        raise ValueError(f"q heads/dim {num_q_heads}/{head_dim} do not fit cache heads/dim {num_kv_heads}/{k_cache.shape[3]}")
    if head_dim < 16:
        raise ValueError(f"head_dim {head_dim} < 16 is not supported by the Triton kernel")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise TypeError(f"q, k_cache, v_cache dtypes differ: {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("q, k_cache and v_cache need a contiguous head_dim (last stride 1)")
    for name, t, dims in (("query_start_loc", query_start_loc, 1), ("seq_lens", seq_lens, 1), ("block_tables", block_tables, 2)):
        if t.dtype != torch.int32 or t.dim() != dims or t.device != q.device:
            raise TypeError(f"{name} must be an int32 {dims}-d tensor on {q.device}; got {t.dtype} {tuple(t.shape)} on {t.device}")
    if block_tables.stride(1) != 1:
        raise ValueError("block_tables rows must be contiguous")
    num_reqs = seq_lens.shape[0]
    if query_start_loc.shape[0] != num_reqs + 1 or block_tables.shape[0] != num_reqs:
        raise ValueError(f"query_start_loc needs B+1={num_reqs + 1} and block_tables B rows; got "
                         f"{query_start_loc.shape[0]} and {block_tables.shape[0]}")
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding_window must be positive or None; got {sliding_window}")
    if logit_softcap is not None and logit_softcap <= 0:
        raise ValueError(f"logit_softcap must be positive or None; got {logit_softcap}")


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _choose_num_splits(q: torch.Tensor, num_programs: int, max_query_len: int | None, max_seq_len: int | None) -> int:
    """Split the key range only when few programs would each walk a long context (decode, small batch).

    Splits when there are fewer than two (request, kv head) programs per SM, aiming for about four,
    each split keeping at least 256 keys so the merge stays negligible. Measured on H100 (bf16,
    Hkv=8): batch 1 x 4096 context 100 -> 12 us with 16 splits; batch 32 x 4096 (256 programs)
    200 -> 190 us with 3 splits; batch 64 x 2048 (512 programs) got slower split in two (103 -> 119 us),
    hence the 2-per-SM threshold.
    """
    if not q.is_cuda or max_query_len is None or max_seq_len is None or max_query_len > 1:
        return 1
    num_sms = _num_sms(q.device.index if q.device.index is not None else torch.cuda.current_device())
    if num_programs >= 2 * num_sms or max_seq_len < 512:
        return 1
    return max(1, min(triton.cdiv(4 * num_sms, num_programs), max_seq_len // 256, 32))


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and launch parameters of `_paged_attention_kernel` (see `launch_config`)."""

    block_m: int
    """Query rows per program (tokens x padded group heads); at least the padded group."""
    block_n: int
    """Keys per inner-loop iteration."""
    num_warps: int = 4
    num_stages: int = 3
    kv_heads: int = 1
    """Kv heads a program reads side by side (adjacent in the cache: a longer contiguous read a
    key); a head count it does not divide takes their greatest common divisor."""


def launch_config(head_dim: int, decode_only: bool, small_grid: bool = False) -> LaunchConfig:
    """The default tiles, from `loadtests/tune_attention.py` on an H100 and an H200 (docs/benchmarks.md).

    Decode (every query one token) is bound by reading K/V: 16-row tiles of 32 keys in 2 stages,
    a program reading 4 kv heads side by side at head_dim 64 (512 contiguous bytes a key) and 2 at
    128 (when the batch fills the GPU with such programs: `_default_config`). On the H200 that took
    256 x 576 tokens, head_dim 64, from 79 % of copy bandwidth to 90 % alone (100 -> 88 us a layer
    in the 1B engine's step), and 128/256 x 1,024 tokens, head_dim 128, from 93-95 % to 97-99 %
    alone (the 8B engine's forward unchanged; docs/benchmarks.md, section 24).
    Prefill is bound by the two dots: 128-row tiles on 8 warps in 2 stages gave 1.19x (head_dim 64)
    and 1.21x (head_dim 128) over 64-row tiles on 4 warps at 32 x 512 tokens. A prefill whose
    128-row grid leaves SMs idle (`small_grid`: one short prompt, e.g. an agent turn's new tokens
    over its cached history) takes 64-row tiles, 64 keys, 3 stages: twice the programs; on the
    H200 528 tokens over 5,632 ran 1.66x faster (head_dim 128) and 1.09x (head_dim 64).
    """
    if small_grid and not decode_only and head_dim <= 128:
        return LaunchConfig(block_m=64, block_n=64, num_warps=4, num_stages=3)
    if decode_only:
        if head_dim <= 128:
            return LaunchConfig(block_m=16, block_n=32, num_warps=4, num_stages=2, kv_heads=4 if head_dim <= 64 else 2)
        return LaunchConfig(block_m=16, block_n=64, num_warps=4, num_stages=3)
    if head_dim <= 128:
        return LaunchConfig(block_m=128, block_n=64 if head_dim <= 64 else 32, num_warps=8, num_stages=2)
    return LaunchConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)


def query_tiles(num_tokens: int, num_reqs: int, config: LaunchConfig, group_pad: int,
                kv_heads: int = 1) -> tuple[int, int]:
    """(tokens a query tile, query tiles of the grid) under `config`: a tile holds `block_m` rows of
    (token, kv head, group head), and each request may leave one tile part-filled."""
    heads = group_pad * kv_heads
    block_q = max(config.block_m, heads) // heads
    return block_q, num_tokens // block_q + num_reqs


def kv_heads_a_program(config: LaunchConfig, num_kv_heads: int) -> int:
    """`config.kv_heads`, or the largest count that divides the model's kv heads as well."""
    return math.gcd(config.kv_heads, num_kv_heads)


def is_small_grid(num_tiles: int, num_kv_heads: int, num_sms: int) -> bool:
    """Fewer than two (query tile, kv head) programs per SM."""
    return num_tiles * num_kv_heads < 2 * num_sms


def _default_config(q: torch.Tensor, head_dim: int, decode_only: bool, num_reqs: int, num_kv_heads: int,
                    group_pad: int) -> LaunchConfig:
    """`launch_config`'s tiles for this batch. On a GPU, a decode batch too small to fill it with
    (request, kv head group) programs reads one kv head a program (its context is then split
    across more of them, `_choose_num_splits`); a prefill that leaves SMs idle takes the small-grid tiles."""
    config = launch_config(head_dim, decode_only)
    if not q.is_cuda:
        return config
    if decode_only:
        groups = num_kv_heads // kv_heads_a_program(config, num_kv_heads)
        few = is_small_grid(num_reqs, groups, _num_sms(q.device.index))
        return dataclasses.replace(config, kv_heads=1) if few else config
    _, num_tiles = query_tiles(q.shape[0], num_reqs, config, group_pad)
    small = is_small_grid(num_tiles, num_kv_heads, _num_sms(q.device.index))
    return launch_config(head_dim, decode_only, small_grid=True) if small else config


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    *,
    logit_softcap: float | None = None,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """Triton paged attention; same contract as `paged_attention_ref`.

    `max_query_len`/`max_seq_len` are optional host-side hints: with `max_query_len == 1` the kernel
    uses decode-sized tiles, and with both it may split long contexts across programs. `num_splits`
    forces the split count (1 = no split); `config` overrides the tiles (for tuning).
    """
    require_triton()
    _check_inputs(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, sliding_window, logit_softcap)
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    num_reqs = seq_lens.shape[0]
    group = num_q_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    decode_only = max_query_len is not None and max_query_len <= 1
    config = config or _default_config(q, head_dim, decode_only, num_reqs, num_kv_heads, group_pad)
    kv_heads = kv_heads_a_program(config, num_kv_heads)
    block_q, num_tiles = query_tiles(num_tokens, num_reqs, config, group_pad, kv_heads)
    if num_splits is None:
        num_splits = _choose_num_splits(q, num_reqs * num_kv_heads // kv_heads, max_query_len, max_seq_len)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1; got {num_splits}")

    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    if num_splits == 1:
        partial, lse = out, out  # lse is unused without splits
        out_strides = (out.stride(0), out.stride(1), 0)
        lse_strides = (0, 0)
    else:
        partial = torch.empty(num_tokens, num_q_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(num_tokens, num_q_heads, num_splits, dtype=torch.float32, device=q.device)
        out_strides = (partial.stride(0), partial.stride(1), partial.stride(2))
        lse_strides = (lse.stride(0), lse.stride(1))

    head_dim_pad = triton.next_power_of_2(head_dim)
    _paged_attention_kernel[(num_tiles, num_kv_heads // kv_heads, num_splits)](
        partial, lse, q, k_cache, v_cache, query_start_loc, seq_lens, block_tables,
        num_reqs, scale * _LOG2E, sliding_window or 0, logit_softcap or 0.0,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        *out_strides, *lse_strides,
        BLOCK_SIZE=block_size, GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q,
        BLOCK_N=config.block_n, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
        NUM_SPLITS=num_splits, USE_WINDOW=sliding_window is not None, USE_SOFTCAP=logit_softcap is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", KV_HEADS=kv_heads,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if num_splits > 1:
        _combine_splits_kernel[(num_tokens, num_q_heads)](
            out, partial, lse, num_q_heads, out.stride(0), out.stride(1),
            NUM_SPLITS=num_splits, SPLITS_PAD=triton.next_power_of_2(num_splits),
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
        )
    return out
