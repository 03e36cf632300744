"""Whole-head KV blocks <-> the head shards that N tensor-parallel ranks hold (P/D across TP sizes).

The KV transfer (shared/transfer/) always moves whole-head blocks between the engine processes
(rank 0 of each side), so a prefill at one tensor-parallel size can feed a decode at another:

    prefill hold:   every rank sends its shard of the blocks to rank 0 (gather) -> rank 0 joins
                    them along the head axis into a staging tensor the data plane sends from
    decode loaded:  rank 0 cuts the received whole-head blocks into each rank's head range
                    (replicated heads included) and sends every rank its part (scatter)

Both are collectives over the tensor-parallel group, so rank 0 issues them on its engine thread
between model calls and mirrors them to the followers (GatherKV / ScatterKV), like the model
calls: every rank meets the collectives in the same order. With one rank nothing here is used;
the connector reads and writes the pool directly.
"""

from __future__ import annotations

import torch

from splitserve.shared.parallel import state


def _index(kv_cache: torch.Tensor, block_ids: list[int]) -> torch.Tensor:
    return torch.tensor(block_ids, dtype=torch.long, device=kv_cache.device)


def gather_blocks(kv_cache: torch.Tensor, block_ids: list[int]) -> list[torch.Tensor] | None:
    """Every rank calls it: rank 0 gets each rank's shard [n, L, 2, block_size, h, D] in rank order."""
    return state.gather_to_rank0(kv_cache.index_select(0, _index(kv_cache, block_ids)))


def scatter_blocks(kv_cache: torch.Tensor, block_ids: list[int], parts: list[torch.Tensor] | None) -> None:
    """Every rank calls it (rank 0 with every rank's part): each writes its part into its blocks."""
    shape = (len(block_ids), *kv_cache.shape[1:])
    shard = state.scatter_from_rank0(torch.empty(shape, dtype=kv_cache.dtype, device=kv_cache.device), parts)
    kv_cache.index_copy_(0, _index(kv_cache, block_ids), shard)


def whole_heads(parts: list[torch.Tensor], num_kv_heads: int) -> torch.Tensor:
    """The ranks' shards joined along the head axis; a head replicated on several ranks is taken
    from the first of them (rank r holds heads from r * num_kv_heads // N)."""
    replicas = max(1, len(parts) // num_kv_heads)
    return torch.cat(parts[::replicas], dim=4)


def head_shards(blocks: torch.Tensor, world_size: int) -> list[torch.Tensor]:
    """Each rank's head range of whole-head `blocks` [n, L, 2, block_size, Hkv, D]."""
    num_kv_heads = blocks.shape[4]
    per_rank = max(1, num_kv_heads // world_size)
    firsts = [rank * num_kv_heads // world_size for rank in range(world_size)]
    return [blocks[:, :, :, :, first:first + per_rank].contiguous() for first in firsts]


class KvShards:
    """Rank 0's access to whole-head copies of blocks whose heads are spread over its ranks."""

    def __init__(self, kv_cache: torch.Tensor, followers, num_kv_heads: int) -> None:
        self.kv_cache, self.followers, self.num_kv_heads = kv_cache, followers, num_kv_heads
        self.world_size = followers.world_size

    def staging(self, num_blocks: int) -> torch.Tensor:
        """An uninitialised whole-head buffer for `num_blocks` blocks, on the pool's device."""
        _, layers, two, block_size, _, head_dim = self.kv_cache.shape
        return torch.empty(num_blocks, layers, two, block_size, self.num_kv_heads, head_dim,
                           dtype=self.kv_cache.dtype, device=self.kv_cache.device)

    def gather(self, block_ids: list[int]) -> torch.Tensor:
        """Whole-head copies of `block_ids` [n, L, 2, block_size, Hkv, D] (engine thread only)."""
        self.followers.gather_kv(block_ids)
        blocks = whole_heads(gather_blocks(self.kv_cache, block_ids), self.num_kv_heads)
        if blocks.is_cuda:  # the data plane reads it from its own thread, outside this stream's order
            torch.cuda.current_stream(blocks.device).synchronize()
        return blocks

    def scatter(self, blocks: torch.Tensor, block_ids: list[int]) -> None:
        """Writes whole-head `blocks` into `block_ids` on every rank (engine thread only)."""
        self.followers.scatter_kv(block_ids)
        scatter_blocks(self.kv_cache, block_ids, head_shards(blocks, self.world_size))
