"""Mixture-of-experts MLP over stacked expert weights: each token through its top-k experts.

    out[t] = sum_j topk_weights[t, j] * down_e(act(gate_e(x[t])) * up_e(x[t])),  e = topk_ids[t, j]

with `w13 [E, 2I, H]` (gate rows then up rows of each expert, as Hugging Face stacks them) and
`w2 [E, H, I]`. `fused_moe_ref` is the plain-torch oracle and CPU path: one expert at a time over
the tokens routed to it, like transformers' eager experts. The Triton path (`fused_moe`) sorts the
(token, slot) pairs by expert and pads each expert's run to a multiple of BLOCK_M, so each tile of
rows belongs to one expert; two grouped GEMM kernels then walk the tiles:
  1. `_gate_up_kernel`: x rows @ w13[e].T for the gate and the up columns of one N tile, the
     activation and the product fused, into `inter [padded pairs, I]`;
  2. `_down_kernel`: inter rows @ w2[e].T, scaled by the pair's routing weight, into
     `pair_out [T * k, H]`, which is summed over the k slots.
Routing is the model's business (softmax then top-k, renormalised or not); this file takes its result.
Sizes here never leave the device: the tile count is bounded by `T*k/BLOCK_M + E`, so the launch
needs no host sync and can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitserve.kernels.activation import ACTIVATION_IDS, gate_activation
from splitserve.kernels.activation import gelu_tanh_and_mul_ref, silu_and_mul_ref
from splitserve.kernels.triton_import import require_triton, tl, triton

_ACT_AND_MUL = {"silu": silu_and_mul_ref, "gelu_pytorch_tanh": gelu_tanh_and_mul_ref}


def fused_moe_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """`x [T, H]`, `topk_weights [T, k]`, `topk_ids [T, k]` -> `[T, H]` in `x.dtype`."""
    out = torch.zeros_like(x)
    act_and_mul = _ACT_AND_MUL[activation]
    for expert in torch.unique(topk_ids).tolist():
        token_idx, slot = torch.where(topk_ids == expert)
        hidden = act_and_mul(x[token_idx] @ w13[expert].t())  # [n, I]
        expert_out = (hidden @ w2[expert].t()) * topk_weights[token_idx, slot, None].to(x.dtype)
        out.index_add_(0, token_idx, expert_out.to(x.dtype))
    return out


# ---------------------------------------------------------------- alignment (torch, on device)


def align_pairs_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort the T*k (token, slot) pairs by expert, each expert's run padded to a multiple of `block_m`.

    Returns `pair_of_row [max_rows]` int32 (pair index t*k + j, -1 for padding) and
    `expert_of_tile [max_rows // block_m]` int32 (-1 past the last used tile), where
    `max_rows = cdiv(T*k, block_m) * block_m + E * block_m` bounds every routing."""
    flat = topk_ids.reshape(-1).to(torch.int64)
    num_pairs = flat.numel()
    device = flat.device
    max_tiles = -(-num_pairs // block_m) + num_experts
    # scatter_add rather than bincount, whose CUDA version reads the maximum back to the host
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    padded_start = padded_end - padded
    order = torch.argsort(flat, stable=True)  # pairs grouped by expert
    sorted_expert = flat[order]
    run_start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(num_pairs, device=device) - run_start[sorted_expert]  # place within its expert's run
    pair_of_row = torch.full((max_tiles * block_m,), -1, dtype=torch.int32, device=device)
    pair_of_row[padded_start[sorted_expert] + rank] = order.to(torch.int32)
    tile_start = torch.arange(max_tiles, device=device) * block_m
    expert_of_tile = torch.searchsorted(padded_end, tile_start, right=True).to(torch.int32)
    expert_of_tile = torch.where(expert_of_tile < num_experts, expert_of_tile, -1)
    return pair_of_row, expert_of_tile


# ---------------------------------------------------------------- Triton kernels


@triton.jit
def _gate_up_kernel(
    inter_ptr,  # [max_rows, I] in x's dtype; rows are padded positions
    x_ptr,  # [T, H]
    w13_ptr,  # [E, 2I, H]
    pair_of_row_ptr,
    expert_of_tile_ptr,
    stride_xt,
    stride_we, stride_wn,
    TOP_K: tl.constexpr,
    HIDDEN: tl.constexpr,
    INTER: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACTIVATION: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    expert = tl.load(expert_of_tile_ptr + tile)
    if expert < 0:
        return
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(pair_of_row_ptr + rows)
    row_ok = pair >= 0
    token = tl.where(row_ok, pair // TOP_K, 0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < INTER
    w_base = w13_ptr + expert.to(tl.int64) * stride_we
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, HIDDEN, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < HIDDEN
        a = tl.load(x_ptr + token[:, None] * stride_xt + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & col_ok[None, :]
        w_gate = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None], mask=w_mask, other=0.0)  # [K, N]
        w_up = tl.load(w_base + (INTER + cols[None, :]) * stride_wn + ks[:, None], mask=w_mask, other=0.0)
        acc_gate = tl.dot(a, w_gate, acc_gate, input_precision=DOT_PRECISION)
        acc_up = tl.dot(a, w_up, acc_up, input_precision=DOT_PRECISION)
    out = gate_activation(acc_gate, ACTIVATION) * acc_up
    o_ptrs = inter_ptr + rows.to(tl.int64)[:, None] * INTER + cols[None, :]
    tl.store(o_ptrs, out.to(inter_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(
    pair_out_ptr,  # [T * k, H] in x's dtype
    inter_ptr,  # [max_rows, I]
    w2_ptr,  # [E, H, I]
    topk_weights_ptr,  # [T * k] fp32
    pair_of_row_ptr,
    expert_of_tile_ptr,
    stride_we, stride_wn,
    HIDDEN: tl.constexpr,
    INTER: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    expert = tl.load(expert_of_tile_ptr + tile)
    if expert < 0:
        return
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(pair_of_row_ptr + rows)
    row_ok = pair >= 0
    rows64 = rows.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < HIDDEN
    w_base = w2_ptr + expert.to(tl.int64) * stride_we
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, INTER, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < INTER
        a = tl.load(inter_ptr + rows64[:, None] * INTER + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
    weight = tl.load(topk_weights_ptr + tl.where(row_ok, pair, 0), mask=row_ok, other=0.0)
    out = acc * weight[:, None]
    o_ptrs = pair_out_ptr + tl.where(row_ok, pair, 0).to(tl.int64)[:, None] * HIDDEN + cols[None, :]
    tl.store(o_ptrs, out.to(pair_out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# ---------------------------------------------------------------- wrapper


@dataclass(frozen=True)
class MoeLaunchConfig:
    block_m: int
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3


def moe_launch_config(num_pairs: int, num_experts: int) -> MoeLaunchConfig:
    """Row tiles sized to the tokens an expert gets on average: 16 rows in decode (few tokens per
    expert, so padding stays small), 64 in prefill (tiles reuse each weight tile for more rows)."""
    rows_per_expert = num_pairs / max(num_experts, 1)
    if rows_per_expert <= 16:
        return MoeLaunchConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4)
    return MoeLaunchConfig(block_m=64, block_n=128, block_k=64, num_warps=8, num_stages=3)


def _check_inputs(x, w13, w2, topk_weights, topk_ids, activation) -> None:
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"expected x [T, H], w13 [E, 2I, H], w2 [E, H, I]; got {tuple(x.shape)}, "
                         f"{tuple(w13.shape)}, {tuple(w2.shape)}")
    num_experts, two_inter, hidden = w13.shape
    if hidden != x.shape[1] or w2.shape != (num_experts, hidden, two_inter // 2) or two_inter % 2:
        raise ValueError(f"w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} do not fit x {tuple(x.shape)}")
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} must be [T, k]")
    if not (x.dtype == w13.dtype == w2.dtype):
        raise TypeError(f"x, w13, w2 dtypes differ: {x.dtype}, {w13.dtype}, {w2.dtype}")
    if x.stride(1) != 1 or w13.stride(2) != 1 or w2.stride(2) != 1:
        raise ValueError("x, w13 and w2 need a contiguous last dimension")
    if activation not in ACTIVATION_IDS:
        raise ValueError(f"activation {activation!r} is not supported (supported: {', '.join(ACTIVATION_IDS)})")


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
    config: MoeLaunchConfig | None = None,
) -> torch.Tensor:
    """Triton fused MoE; same contract as `fused_moe_ref`."""
    require_triton()
    _check_inputs(x, w13, w2, topk_weights, topk_ids, activation)
    num_tokens, hidden = x.shape
    num_experts, inter = w13.shape[0], w2.shape[2]
    top_k = topk_ids.shape[1]
    if num_tokens == 0:
        return torch.zeros_like(x)
    config = config or moe_launch_config(num_tokens * top_k, num_experts)
    pair_of_row, expert_of_tile = align_pairs_by_expert(topk_ids, num_experts, config.block_m)
    num_tiles = expert_of_tile.shape[0]
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    inter_rows = torch.empty(pair_of_row.shape[0], inter, dtype=x.dtype, device=x.device)
    _gate_up_kernel[(num_tiles, triton.cdiv(inter, config.block_n))](
        inter_rows, x, w13, pair_of_row, expert_of_tile, x.stride(0), w13.stride(0), w13.stride(1),
        TOP_K=top_k, HIDDEN=hidden, INTER=inter, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, ACTIVATION=ACTIVATION_IDS[activation], DOT_PRECISION=precision,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    pair_out = torch.empty(num_tokens * top_k, hidden, dtype=x.dtype, device=x.device)
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    _down_kernel[(num_tiles, triton.cdiv(hidden, config.block_n))](
        pair_out, inter_rows, w2, weights, pair_of_row, expert_of_tile, w2.stride(0), w2.stride(1),
        HIDDEN=hidden, INTER=inter, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        DOT_PRECISION=precision, num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return pair_out.view(num_tokens, top_k, hidden).sum(dim=1)
