"""Coalescing block lists into runs that are contiguous on both sides.

In the block-major layout (kv_cache[num_blocks, num_layers, 2, block_size, Hkv, D]) block b is
one contiguous region and blocks b..b+n-1 are one larger contiguous region. A transfer of
src blocks [3,4,5,9,20] into dst blocks [10,11,40,41,42] therefore needs only the runs where
*both* ids step by one together: (3->10, 2), (5->40, 1), (9->41, 1), (20->42, 1). One message
per run instead of one per block (or, worse, one per layer) is what keeps small transfers near
link speed.

A pool split by KV layer group is one such tensor per group: a transfer coalesces each group's
blocks on their own (`group_runs`) and sends the runs group after group, so both sides list the
same regions in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockRun:
    src_start: int
    dst_start: int
    num_blocks: int


def coalesce_runs(src_block_ids: Sequence[int], dst_block_ids: Sequence[int]) -> list[BlockRun]:
    """Pairs src_block_ids[i] -> dst_block_ids[i] and merges neighbours adjacent on both sides."""
    if len(src_block_ids) != len(dst_block_ids):
        raise ValueError(f"{len(src_block_ids)} src blocks but {len(dst_block_ids)} dst blocks")
    runs: list[BlockRun] = []
    for src, dst in zip(src_block_ids, dst_block_ids):
        last = runs[-1] if runs else None
        if last and src == last.src_start + last.num_blocks and dst == last.dst_start + last.num_blocks:
            runs[-1] = BlockRun(last.src_start, last.dst_start, last.num_blocks + 1)
        else:
            runs.append(BlockRun(src, dst, 1))
    return runs


@dataclass(frozen=True)
class GroupRun:
    group: int
    """The pool (KV layer group) the run's blocks live in on both sides."""
    run: BlockRun


def group_runs(src_groups: Sequence[Sequence[int]], dst_groups: Sequence[Sequence[int]]) -> list[GroupRun]:
    """Each group's src -> dst blocks coalesced, groups in order (one pool: one group)."""
    if len(src_groups) != len(dst_groups):
        raise ValueError(f"{len(src_groups)} src block groups but {len(dst_groups)} dst block groups")
    return [GroupRun(g, run) for g, (src, dst) in enumerate(zip(src_groups, dst_groups))
            for run in coalesce_runs(src, dst)]


def group_regions(pools: Sequence[torch.Tensor], runs: Sequence[GroupRun], side: str) -> list[torch.Tensor]:
    """The contiguous view of each run on `side` ('src' or 'dst') in its group's pool."""
    return [run_region(pools[r.group], r.run.src_start if side == "src" else r.run.dst_start, r.run.num_blocks)
            for r in runs]


def run_starts(runs: Sequence[BlockRun]) -> list[int]:
    """Where each run begins in the block list it was coalesced from (runs keep that list's order)."""
    starts, position = [], 0
    for run in runs:
        starts.append(position)
        position += run.num_blocks
    return starts


def run_region(kv_cache: torch.Tensor, start: int, num_blocks: int) -> torch.Tensor:
    """The contiguous view kv_cache[start : start + num_blocks] (no copy)."""
    region = kv_cache[start:start + num_blocks]
    assert region.is_contiguous(), "kv_cache must be contiguous in its block dimension"
    return region


def check_block_ids(block_ids: Sequence[int], num_blocks: int, what: str) -> None:
    """Raises ValueError naming `what` if an id is out of range or repeated."""
    bad = [b for b in block_ids if not isinstance(b, int) or not 0 <= b < num_blocks]
    if bad:
        raise ValueError(f"{what}: block ids {bad[:8]} out of range [0, {num_blocks})")
    if len(set(block_ids)) != len(block_ids):
        raise ValueError(f"{what}: repeated block ids in {list(block_ids)[:16]}")
