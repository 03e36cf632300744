"""Block tables for models whose every attention layer slides by one window: blocks the window has
slid past go back to the pool.

A query at position p sees keys j with p - j < window, and a request's later queries only move
forward, so once `num_computed_tokens` tokens are computed, keys j <= num_computed_tokens - window
are never read again. A block wholly made of such keys is released: its table entry is replaced by
the manager's one reserved **null block** (never allocated, never hashed) and the block itself is
freed to the pool, where a block the prefix cache registered stays findable until evicted (its
K/V is still exact for its prefix). Table positions do not shift, so slot arithmetic is unchanged;
attention reads of a null entry only happen inside the kernels' tile rounding before the window
and are masked.

With one pool the engine releases only for requests whose KV is not being held for a transfer
to another engine, so what a decode instance receives, and registers in its prefix cache, is
always real (a split pool hands out only the blocks the window still sees, layer_groups.py).
Interleaved models (some layers global) give their sliding layers a pool and a manager of this
kind of their own (layer_groups.py), where a prefix hit needs only the blocks its window can see:
`hit_blocks` returns null entries for the rest, and `allocate_slots` adopts them as released.
"""

from __future__ import annotations

from collections import Counter

from splitserve.shared.kv.block_pool import _require
from splitserve.shared.kv.kv_cache_manager import KVCacheManager


class SlidingWindowKVCacheManager(KVCacheManager):
    def __init__(self, num_blocks: int, block_size: int, window: int, enable_prefix_caching: bool = True):
        if window <= 0:
            raise ValueError(f"window must be positive, got {window}")
        if num_blocks < 2:
            raise ValueError(f"a sliding-window pool needs at least 2 blocks (one is the null block), got {num_blocks}")
        super().__init__(num_blocks, block_size, enable_prefix_caching)
        self.window = window
        self.null_block = self.pool.allocate(1)[0]  # held forever: refcount 1, in no table's count
        self._num_released: dict[str, int] = {}

    def num_dead_blocks(self, num_computed_tokens: int) -> int:
        """Leading blocks no query after `num_computed_tokens` computed tokens can see."""
        return max(0, (num_computed_tokens - self.window + 1) // self.block_size)

    def _is_placeholder(self, block_id: int) -> bool:
        return block_id == self.null_block

    def hit_bound(self, block_hashes) -> int:
        return len(block_hashes)  # blocks before the window need not be cached

    def hit_blocks(self, block_hashes, num_blocks: int) -> list[int] | None:
        """A hit of `num_blocks` blocks needs only those a query after them can see, the last
        `window` tokens' (keys from `num_blocks * block_size - window + 1` on); the rest of the head
        is null entries. None when one of the needed blocks is not cached."""
        num_dead = min(self.num_dead_blocks(num_blocks * self.block_size), num_blocks)
        live = [self.pool.lookup(h) for h in block_hashes[num_dead:num_blocks]]
        return None if None in live else [self.null_block] * num_dead + live

    def allocate_slots(self, request_id, token_ids, num_computed_tokens, num_new_tokens, new_computed_blocks=(),
                       block_hashes=None):
        """The parent's, except that a hit's head may be null entries (`hit_blocks`): they count
        as released blocks of the request."""
        num_null = next((i for i, b in enumerate(new_computed_blocks) if b != self.null_block),
                        len(new_computed_blocks))
        if self.null_block in new_computed_blocks[num_null:]:
            raise ValueError(f"request {request_id!r}: null entries only lead a hit, got {list(new_computed_blocks)}")
        table = super().allocate_slots(request_id, token_ids, num_computed_tokens, num_new_tokens, new_computed_blocks,
                                       block_hashes)
        if table is not None and num_null:
            self._num_released[request_id] = num_null
        return table

    def reset_prefix_cache(self) -> bool:
        """The parent's, with the null block (always held) set aside meanwhile."""
        if self.pool.num_free_blocks != self.pool.num_blocks - 1:
            return False
        self.pool.free([self.null_block])
        reset = self.pool.reset_prefix_cache()
        self.null_block = self.pool.allocate(1)[0]
        return reset

    def release_out_of_window(self, request_id: str, num_computed_tokens: int) -> int:
        """Free the request's blocks that slid out of the window; returns how many were freed."""
        table = self._tables.get(request_id)
        if not table:
            return 0
        start = self._num_released.get(request_id, 0)
        end = min(self.num_dead_blocks(num_computed_tokens), len(table))
        if self.enable_prefix_caching:  # only blocks whose hash is registered (cache_computed_blocks ran)
            end = min(end, len(self._block_hashes.get(request_id, ())))
        if end <= start:
            return 0
        dead = table[start:end]
        table[start:end] = [self.null_block] * (end - start)
        self._rows[self._row_of[request_id], start:end] = self.null_block
        self._num_released[request_id] = end
        self.pool.free(dead)
        return end - start

    def free(self, request_id: str) -> None:
        num_released = self._num_released.pop(request_id, 0)
        table = self._tables.get(request_id)
        if table and num_released:
            self._rows[self._row_of[request_id], : len(table)] = 0
            del table[:num_released]  # the null entries; the parent frees the rest, tail first
        super().free(request_id)

    def check_integrity(self) -> None:
        """The parent's invariants with null entries left out; the null block is held once, by us."""
        self.pool.check_integrity()
        _require(self.pool.refcount(self.null_block) == 1, "the null block was freed or shared")
        _require(self.pool.cached_hash(self.null_block) is None, "the null block was hashed")
        holders = Counter(b for t in self._tables.values() for b in t if b != self.null_block)
        for request_id, table in self._tables.items():
            num_released = self._num_released.get(request_id, 0)
            _require(all(b == self.null_block for b in table[:num_released])
                     and self.null_block not in table[num_released:],
                     f"request {request_id!r}: null entries are not exactly its {num_released} released blocks")
            live = table[num_released:]
            _require(len(set(live)) == len(live), f"request {request_id!r} holds a block twice: {table}")
            row = self._row_of.get(request_id)
            _require(row is not None and self._rows[row, : len(table)].tolist() == table
                     and not self._rows[row, len(table):].any(),
                     f"request {request_id!r}: the numpy mirror of its table is stale")
        _require(len(self._row_of) == len(self._tables), "the numpy mirror holds rows of freed requests")
        for block_id in range(self.pool.num_blocks):
            if block_id != self.null_block:
                refcount, held = self.pool.refcount(block_id), holders[block_id]
                _require(refcount == held, f"block {block_id}: refcount {refcount} but held by {held} tables")
        for request_id, hashes in self._block_hashes.items():
            table = self._tables[request_id]
            _require(len(hashes) <= len(table), f"request {request_id!r} hashed more blocks than it holds")
            for block_id, block_hash in list(zip(table, hashes))[self._num_released.get(request_id, 0):]:
                cached = self.pool.cached_hash(block_id)
                _require(cached in (None, block_hash), f"{request_id!r}: block {block_id} holds another hash")
