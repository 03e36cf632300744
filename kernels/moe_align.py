"""The fused MoE's alignment: the T*k (token, slot) pairs sorted by expert, each expert's run padded
to a multiple of `block_m` rows, so each row tile of the grouped GEMMs belongs to one expert.

Outputs, with `max_tiles = cdiv(T*k, block_m) + E` (a bound every routing fits, so no size ever
leaves the device and the launch can be captured in a CUDA graph):
  - `pair_of_row [max_tiles * block_m]` int32: pair index t*k + j, -1 for padding;
  - `expert_of_tile [max_tiles]` int32: the tile's expert, -1 past the last used tile.
Within an expert's run the pairs keep their order (a stable sort). `align_pairs_by_expert_ref` is
torch (about 25 ops: a launch each on the GPU); `align_pairs_by_expert` is one Triton launch of
E + 1 programs: each counts every expert's pairs (a histogram), takes its run's start from the
padded counts before it, and places its own pairs by a running prefix sum; the last fills the tail.
"""

from __future__ import annotations

import torch

from splitserve.kernels.triton_import import require_triton, tl, triton


def max_tiles(num_pairs: int, num_experts: int, block_m: int) -> int:
    return -(-num_pairs // block_m) + num_experts


def align_pairs_by_expert_ref(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`topk_ids [T, k]` -> `(pair_of_row, expert_of_tile)`, in torch ops."""
    flat = topk_ids.reshape(-1).to(torch.int64)
    num_pairs = flat.numel()
    device = flat.device
    tiles = max_tiles(num_pairs, num_experts, block_m)
    # scatter_add rather than bincount, whose CUDA version reads the maximum back to the host
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    padded_start = padded_end - padded
    order = torch.argsort(flat, stable=True)  # pairs grouped by expert
    sorted_expert = flat[order]
    run_start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(num_pairs, device=device) - run_start[sorted_expert]  # place within its expert's run
    pair_of_row = torch.full((tiles * block_m,), -1, dtype=torch.int32, device=device)
    pair_of_row[padded_start[sorted_expert] + rank] = order.to(torch.int32)
    tile_start = torch.arange(tiles, device=device) * block_m
    expert_of_tile = torch.searchsorted(padded_end, tile_start, right=True).to(torch.int32)
    expert_of_tile = torch.where(expert_of_tile < num_experts, expert_of_tile, -1)
    return pair_of_row, expert_of_tile


@triton.jit
def _fill(ptr, start, end, value, BLOCK: tl.constexpr):
    for i in range(start, end, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        tl.store(ptr + offs, tl.zeros([BLOCK], tl.int32) + value, mask=offs < end)


@triton.jit(do_not_specialize=["num_pairs", "num_tiles"])  # they follow the token count
def _align_kernel(
    pair_of_row_ptr,  # [max_tiles * BLOCK_M] int32
    expert_of_tile_ptr,  # [max_tiles] int32
    topk_ids_ptr,  # [num_pairs], any integer type
    num_pairs,
    num_tiles,
    NUM_EXPERTS: tl.constexpr,
    NUM_BINS: tl.constexpr,  # a power of two > NUM_EXPERTS: bin NUM_EXPERTS takes the masked lanes
    BLOCK_M: tl.constexpr,
    BLOCK: tl.constexpr,
):
    expert = tl.program_id(0)  # program NUM_EXPERTS writes the tail past the last expert's run
    counts = tl.zeros([NUM_BINS], tl.int32)
    for p0 in range(0, num_pairs, BLOCK):
        offs = p0 + tl.arange(0, BLOCK)
        ids = tl.load(topk_ids_ptr + offs, mask=offs < num_pairs, other=NUM_EXPERTS).to(tl.int32)
        counts += tl.histogram(ids, NUM_BINS)
    bins = tl.arange(0, NUM_BINS)
    padded = tl.where(bins < NUM_EXPERTS, (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M, 0)
    start = tl.sum(tl.where(bins < expert, padded, 0), 0)  # rows of the experts before this one
    if expert == NUM_EXPERTS:
        _fill(expert_of_tile_ptr, start // BLOCK_M, num_tiles, -1, BLOCK)
        _fill(pair_of_row_ptr, start, num_tiles * BLOCK_M, -1, BLOCK)
        return
    next_row = start
    for p0 in range(0, num_pairs, BLOCK):
        offs = p0 + tl.arange(0, BLOCK)
        ids = tl.load(topk_ids_ptr + offs, mask=offs < num_pairs, other=NUM_EXPERTS).to(tl.int32)
        mine = (ids == expert).to(tl.int32)
        tl.store(pair_of_row_ptr + next_row + tl.cumsum(mine, 0) - 1, offs.to(tl.int32), mask=mine > 0)
        next_row += tl.sum(mine, 0)
    run_rows = tl.sum(tl.where(bins == expert, padded, 0), 0)
    _fill(pair_of_row_ptr, next_row, start + run_rows, -1, BLOCK_M)
    _fill(expert_of_tile_ptr, start // BLOCK_M, (start + run_rows) // BLOCK_M, expert, BLOCK)


def align_pairs_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton alignment; same contract as `align_pairs_by_expert_ref`."""
    require_triton()
    if not topk_ids.is_contiguous():
        raise ValueError("topk_ids must be contiguous")
    num_pairs = topk_ids.numel()
    tiles = max_tiles(num_pairs, num_experts, block_m)
    pair_of_row = torch.empty(tiles * block_m, dtype=torch.int32, device=topk_ids.device)
    expert_of_tile = torch.empty(tiles, dtype=torch.int32, device=topk_ids.device)
    block = min(4096, max(128, triton.next_power_of_2(num_pairs)))  # few sizes, so few compiles
    _align_kernel[(num_experts + 1,)](
        pair_of_row, expert_of_tile, topk_ids, num_pairs, tiles, NUM_EXPERTS=num_experts,
        NUM_BINS=triton.next_power_of_2(num_experts + 1), BLOCK_M=block_m, BLOCK=block,
    )
    return pair_of_row, expert_of_tile
