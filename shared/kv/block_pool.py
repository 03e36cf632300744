"""`BlockPool`: the KV blocks of one engine, their refcounts, and the prefix cache's hash map.

Every block is in exactly one of three states:

    free       refcount 0, holds no hash          (`_free`, a FIFO deque)
    evictable  refcount 0, holds a hash           (LRU order: first = evicted next), in one of two
               classes: anonymous (`_evictable`) and retained (`_evictable_retained`: its hash
               belongs to a keyed session, see `retain_hashes`), evicted only when no anonymous
               block is left
    in use     refcount > 0, may hold a hash (a host-tier copy in flight holds a reference too)

    free ──allocate──▶ in use ──free (ref→0, no hash)──▶ free
                         │  ▲
       free (ref→0, hash)│  │incref (prefix hit)
                         ▼  │
                      evictable ──allocate (evict: hash dropped)──▶ in use

Block ids are plain ints 0..num_blocks-1 and block 0 is an ordinary block: there is no reserved
null block (padding in `block_tables` is harmless because `seq_lens` bounds every read).

Eviction order is LRU over evictable blocks: `free()` appends in the order it is given, so a
caller that frees a request's table tail first makes the tail least recent. Tails are then evicted
before the shared prefix blocks that other requests are likely to hit.

All operations are O(1) per block. Only the engine thread touches a pool.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Iterable

from splitserve.shared.kv.block_hash import BlockHash


class NoFreeBlocksError(RuntimeError):
    """`allocate()` asked for more blocks than are free or evictable; the pool is unchanged."""


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self._refcounts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._evictable_retained: OrderedDict[int, None] = OrderedDict()
        self._retained: Counter[BlockHash] = Counter()
        """Hashes keyed sessions retain, counted per session that holds them."""
        self._hash_of_block: dict[int, BlockHash] = {}
        self._block_of_hash: dict[BlockHash, int] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks `allocate()` can hand out now: free ones plus evictable cached ones."""
        return len(self._free) + len(self._evictable) + len(self._evictable_retained)

    @property
    def num_retained_evictable_blocks(self) -> int:
        return len(self._evictable_retained)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._hash_of_block)

    def allocate(self, n: int) -> list[int]:
        """Take `n` blocks at refcount 1: never-cached free blocks first, then LRU eviction."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        if n > self.num_free_blocks:
            raise NoFreeBlocksError(f"asked for {n} blocks, {self.num_free_blocks} free of {self.num_blocks}")
        block_ids = []
        for _ in range(n):
            if self._free:
                block_id = self._free.popleft()
            else:
                lru = self._evictable or self._evictable_retained
                block_id, _ = lru.popitem(last=False)
                del self._block_of_hash[self._hash_of_block.pop(block_id)]
            self._refcounts[block_id] = 1
            block_ids.append(block_id)
        return block_ids

    def incref(self, block_ids: Iterable[int]) -> None:
        """Add a reference to each block (sharing a prefix hit or forking). All-or-nothing."""
        block_ids = list(block_ids)
        for block_id in block_ids:
            self._check_id(block_id)
            if self._refcounts[block_id] == 0 and not self._is_evictable(block_id):
                raise ValueError(f"block {block_id} is free; take it with allocate(), not incref()")
        for block_id in block_ids:
            if self._refcounts[block_id] == 0:
                (self._evictable if block_id in self._evictable else self._evictable_retained).pop(block_id)
            self._refcounts[block_id] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference per listed block, in order. All-or-nothing on a double free."""
        block_ids = list(block_ids)
        for block_id, count in Counter(block_ids).items():
            self._check_id(block_id)
            if count > self._refcounts[block_id]:
                refcount = self._refcounts[block_id]
                raise ValueError(f"double free of block {block_id} (refcount {refcount}, freed {count}x)")
        for block_id in block_ids:
            self._refcounts[block_id] -= 1
            if self._refcounts[block_id] > 0:
                continue
            block_hash = self._hash_of_block.get(block_id)
            if block_hash is not None:  # to the most recently used end of its class
                (self._evictable_retained if block_hash in self._retained else self._evictable)[block_id] = None
            else:
                self._free.append(block_id)

    def lookup(self, block_hash: BlockHash) -> int | None:
        """The block holding `block_hash`, if cached (in use or evictable). Takes no reference."""
        return self._block_of_hash.get(block_hash)

    def cached_hash(self, block_id: int) -> BlockHash | None:
        """The hash `block_id` is registered under, or None."""
        return self._hash_of_block.get(block_id)

    def cache_block(self, block_id: int, block_hash: BlockHash) -> bool:
        """Record that the in-use `block_id` holds the full block `block_hash`; True if it now does.

        If another block already holds that hash, the existing mapping wins and `block_id` stays
        uncached (it returns to the free list when released); a duplicate costs memory, not
        correctness.
        """
        self._check_id(block_id)
        if self._refcounts[block_id] == 0:
            raise ValueError(f"block {block_id} is not in use; only referenced blocks can be cached")
        if not self.enable_caching or block_hash in self._block_of_hash:
            return False
        if block_id in self._hash_of_block:
            raise ValueError(f"block {block_id} already holds a different hash")
        self._hash_of_block[block_id] = block_hash
        self._block_of_hash[block_hash] = block_id
        return True

    def retain_hashes(self, block_hashes: Iterable[BlockHash], retained: bool) -> None:
        """Add (or drop) one session's retention of each hash (a hash need not be cached here: a
        block restored later is retained on arrival); an evictable block whose hash gains its
        first retention (or loses its last) changes class."""
        for block_hash in block_hashes:
            before = block_hash in self._retained
            self._retained[block_hash] += 1 if retained else -1
            if self._retained[block_hash] <= 0:
                del self._retained[block_hash]
            if before != (block_hash in self._retained):
                self._move_class(block_hash, retained)

    def _move_class(self, block_hash: BlockHash, retained: bool) -> None:
        """A block that expired out of retention goes to the evicted-next end of the anonymous LRU
        (it was kept past its anonymous age); a newly retained one to the recent end."""
        block_id = self._block_of_hash.get(block_hash)
        src, dst = ((self._evictable, self._evictable_retained) if retained
                    else (self._evictable_retained, self._evictable))
        if block_id is None or block_id not in src:
            return
        del src[block_id]
        dst[block_id] = None
        if not retained:
            dst.move_to_end(block_id, last=False)

    def _is_evictable(self, block_id: int) -> bool:
        return block_id in self._evictable or block_id in self._evictable_retained

    def refcount(self, block_id: int) -> int:
        self._check_id(block_id)
        return self._refcounts[block_id]

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash. Refused (False) while any block is in use, as in-flight
        requests may still register or hit hashes (e.g. across a weight update)."""
        if self.num_free_blocks != self.num_blocks:
            return False
        self._free.extend([*self._evictable, *self._evictable_retained])
        self._evictable.clear()
        self._evictable_retained.clear()
        self._hash_of_block.clear()
        self._block_of_hash.clear()
        return True

    def check_integrity(self) -> None:
        """Raise AssertionError naming the first violated invariant."""
        in_use = {b for b, ref in enumerate(self._refcounts) if ref > 0}
        free, retained = set(self._free), set(self._evictable_retained)
        _require(not retained & self._evictable.keys(), "a block is in both evictable classes")
        evictable = set(self._evictable) | retained
        _require(all(ref >= 0 for ref in self._refcounts), "negative refcount")
        _require(len(free) == len(self._free), "a block appears twice in the free list")
        _require(not free & evictable, f"blocks both free and evictable: {sorted(free & evictable)}")
        _require(not (free | evictable) & in_use, f"blocks free but referenced: {sorted((free | evictable) & in_use)}")
        counts = f"free {len(free)} + evictable {len(evictable)} + in use {len(in_use)}"
        _require(len(free) + len(evictable) + len(in_use) == self.num_blocks, f"{counts} != {self.num_blocks}")
        _require(not free & self._hash_of_block.keys(), "a free-list block holds a hash")
        _require(evictable <= self._hash_of_block.keys(), "an evictable block holds no hash")
        _require(len(self._hash_of_block) == len(self._block_of_hash), "hash maps differ in size")
        for block_id, block_hash in self._hash_of_block.items():
            _require(self._block_of_hash.get(block_hash) == block_id, f"hash map of block {block_id} is one-way")
        _require(all(self._hash_of_block[b] in self._retained for b in retained), "a retained block lost its session")
        _require(not any(self._hash_of_block[b] in self._retained for b in self._evictable),
                 "an anonymous evictable block holds a retained hash")
        _require(all(n > 0 for n in self._retained.values()), "a retention count is not positive")

    def _check_id(self, block_id: int) -> None:
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block id {block_id} out of range [0, {self.num_blocks})")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)
