"""Mixture-of-experts MLP over stacked expert weights: each token through its top-k experts.

    out[t] = sum_j topk_weights[t, j] * down_e(act(gate_e(x[t])) * up_e(x[t])),  e = topk_ids[t, j]

with `w13 [E, 2I, H]` (gate rows then up rows of each expert, as Hugging Face stacks them) and
`w2 [E, H, I]`. `fused_moe_ref` is the plain-torch oracle and CPU path: one expert at a time over
the tokens routed to it, like transformers' eager experts. The Triton path (`fused_moe`) is four
launches:
  0. `moe_align.align_pairs_by_expert`: the (token, slot) pairs sorted by expert, each expert's run
     padded to a multiple of BLOCK_M, so each tile of rows belongs to one expert;
  1. `_gate_up_kernel`: x rows @ w13[e].T for the gate and the up columns of one N tile, the
     activation and the product fused, into `inter [padded pairs, I]`;
  2. `_down_kernel`: inter rows @ w2[e].T, scaled by the pair's routing weight, into
     `pair_out [T * k, H]`;
  3. `_sum_slots_kernel`: the sum of `pair_out` over the k slots in fp32 (one read of each pair's
     row; torch's sum over the middle dim of `[T, k, H]` ran at about 60 % of that on an H200).
Both GEMMs run a 1-D grid of (row tile, column tile) programs in the swizzled order of `group_m`.
Tiles, warps and stages come from `moe_config.py` (a tuned table per device, else a heuristic).
Routing is the model's business (softmax then top-k, renormalised or not); this file takes its result.
Sizes here never leave the device: the tile count is bounded by `T*k/BLOCK_M + E`, so the launch
needs no host sync and can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch

from splitserve.kernels.activation import ACTIVATION_IDS, gate_activation
from splitserve.kernels.activation import gelu_tanh_and_mul_ref, silu_and_mul_ref
from splitserve.kernels.moe_align import align_pairs_by_expert
from splitserve.kernels.moe_config import MoeLaunchConfig, MoeTile, moe_launch_config
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


# ---------------------------------------------------------------- Triton kernels


@triton.jit
def _swizzled_tile(num_row_tiles, num_col_tiles, GROUP_M: tl.constexpr):
    """Program id -> (row tile, column tile) of a 1-D grid: GROUP_M row tiles take each column
    tile in turn, so the programs running together share the column's weight tile and the group's
    activation rows in L2. GROUP_M 0: every row tile of a column before the next column."""
    pid = tl.program_id(0)
    if GROUP_M == 0:
        row_tile, col_tile = pid % num_row_tiles, pid // num_row_tiles
    else:
        per_group = GROUP_M * num_col_tiles
        first_row = pid // per_group * GROUP_M
        group_rows = tl.minimum(num_row_tiles - first_row, GROUP_M)
        row_tile, col_tile = first_row + (pid % per_group) % group_rows, (pid % per_group) // group_rows
    return row_tile, col_tile


# num_row_tiles follows the token count: unspecialised, so a new count never means a new compile
@triton.jit(do_not_specialize=["num_row_tiles"])
def _gate_up_kernel(
    inter_ptr,  # [max_rows, I] in x's dtype; rows are padded positions
    x_ptr,  # [T, H]
    w13_ptr,  # [E, 2I, H]
    pair_of_row_ptr,
    expert_of_tile_ptr,
    num_row_tiles,
    stride_xt,
    stride_we, stride_wn,
    TOP_K: tl.constexpr,
    HIDDEN: tl.constexpr,
    INTER: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    ACTIVATION: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tile, col_tile = _swizzled_tile(num_row_tiles, tl.cdiv(INTER, BLOCK_N), GROUP_M)
    expert = tl.load(expert_of_tile_ptr + tile)
    if expert < 0:
        return
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(pair_of_row_ptr + rows)
    row_ok = pair >= 0
    token = tl.where(row_ok, pair // TOP_K, 0).to(tl.int64)
    cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
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


@triton.jit(do_not_specialize=["num_row_tiles"])
def _down_kernel(
    pair_out_ptr,  # [T * k, H] in x's dtype
    inter_ptr,  # [max_rows, I]
    w2_ptr,  # [E, H, I]
    topk_weights_ptr,  # [T * k] fp32
    pair_of_row_ptr,
    expert_of_tile_ptr,
    num_row_tiles,
    stride_we, stride_wn,
    HIDDEN: tl.constexpr,
    INTER: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tile, col_tile = _swizzled_tile(num_row_tiles, tl.cdiv(HIDDEN, BLOCK_N), GROUP_M)
    expert = tl.load(expert_of_tile_ptr + tile)
    if expert < 0:
        return
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(pair_of_row_ptr + rows)
    row_ok = pair >= 0
    rows64 = rows.to(tl.int64)
    cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
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
    """Triton fused MoE; same contract as `fused_moe_ref`. `config` defaults to the device's tuned
    table entry for this shape (`kernels/moe_config.py`), else the heuristic."""
    require_triton()
    _check_inputs(x, w13, w2, topk_weights, topk_ids, activation)
    num_tokens, hidden = x.shape
    num_experts, inter, top_k = w13.shape[0], w2.shape[2], topk_ids.shape[1]
    if num_tokens == 0:
        return torch.zeros_like(x)
    config = config or moe_launch_config(x.device, num_tokens, num_experts, inter, hidden, top_k, x.dtype)
    pair_of_row, expert_of_tile = align_pairs_by_expert(topk_ids.contiguous(), num_experts, config.block_m)
    inter_rows = torch.empty(pair_of_row.shape[0], inter, dtype=x.dtype, device=x.device)
    gate_up_rows(inter_rows, x, w13, pair_of_row, expert_of_tile, top_k, activation, config.block_m, config.gate_up)
    pair_out = torch.empty(num_tokens * top_k, hidden, dtype=x.dtype, device=x.device)
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    down_rows(pair_out, inter_rows, w2, weights, pair_of_row, expert_of_tile, config.block_m, config.down)
    return sum_slots(pair_out, top_k)


@triton.jit
def _sum_slots_kernel(out_ptr, pair_out_ptr, TOP_K: tl.constexpr, HIDDEN: tl.constexpr, BLOCK_H: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < HIDDEN
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for slot in tl.static_range(TOP_K):
        acc += tl.load(pair_out_ptr + (token * TOP_K + slot) * HIDDEN + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * HIDDEN + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def sum_slots(pair_out: torch.Tensor, top_k: int) -> torch.Tensor:
    """`pair_out [T * k, H]` (contiguous, token-major) -> `[T, H]`: each token's k rows summed in fp32."""
    hidden = pair_out.shape[1]
    out = torch.empty(pair_out.shape[0] // top_k, hidden, dtype=pair_out.dtype, device=pair_out.device)
    block_h = min(1024, triton.next_power_of_2(hidden))
    _sum_slots_kernel[(out.shape[0], triton.cdiv(hidden, block_h))](
        out, pair_out, TOP_K=top_k, HIDDEN=hidden, BLOCK_H=block_h, num_warps=4)
    return out


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _launch(kernel, grid: tuple[int], args: tuple, constexprs: dict, compile_only: bool) -> None:
    """Launch, or with `compile_only` just compile into Triton's cache (the tuner's compile workers)."""
    if compile_only:
        kernel.warmup(*args, grid=grid, **constexprs)
    else:
        kernel[grid](*args, **constexprs)


def gate_up_rows(inter_rows, x, w13, pair_of_row, expert_of_tile, top_k: int, activation: str, block_m: int,
                 tile: MoeTile, compile_only: bool = False) -> None:
    """`inter_rows [max_rows, I]` = act(gate) * up of every row tile's pairs (padding rows untouched)."""
    hidden, inter = x.shape[1], w13.shape[1] // 2
    num_row_tiles = expert_of_tile.shape[0]
    args = (inter_rows, x, w13, pair_of_row, expert_of_tile, num_row_tiles, x.stride(0), w13.stride(0), w13.stride(1))
    constexprs = dict(
        TOP_K=top_k, HIDDEN=hidden, INTER=inter, BLOCK_M=block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
        GROUP_M=tile.group_m, ACTIVATION=ACTIVATION_IDS[activation], DOT_PRECISION=_dot_precision(x.dtype),
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )
    _launch(_gate_up_kernel, (num_row_tiles * triton.cdiv(inter, tile.block_n),), args, constexprs, compile_only)


def down_rows(pair_out, inter_rows, w2, weights, pair_of_row, expert_of_tile, block_m: int, tile: MoeTile,
              compile_only: bool = False) -> None:
    """`pair_out [T*k, H]` = each pair's `inter_rows` row @ its expert's w2.T, times its weight."""
    hidden, inter = w2.shape[1], w2.shape[2]
    num_row_tiles = expert_of_tile.shape[0]
    args = (pair_out, inter_rows, w2, weights, pair_of_row, expert_of_tile, num_row_tiles, w2.stride(0), w2.stride(1))
    constexprs = dict(
        HIDDEN=hidden, INTER=inter, BLOCK_M=block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
        GROUP_M=tile.group_m, DOT_PRECISION=_dot_precision(w2.dtype), num_warps=tile.num_warps,
        num_stages=tile.num_stages,
    )
    _launch(_down_kernel, (num_row_tiles * triton.cdiv(hidden, tile.block_n),), args, constexprs, compile_only)
