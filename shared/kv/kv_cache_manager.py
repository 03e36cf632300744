"""`KVCacheManager`: each request's block table over one `BlockPool`, plus prefix-cache lookups.

How the scheduler uses it for one request (all on the engine thread):

    hit_blocks, num_hit_tokens = get_computed_blocks(token_ids)          # no references taken
    table = allocate_slots(rid, token_ids, num_hit_tokens, n, hit_blocks)  # None: nothing changed
    ... the runner computes n tokens ...
    cache_computed_blocks(rid, token_ids, num_computed_tokens)           # register full blocks
    allocate_slots(rid, token_ids, num_computed_tokens, n)               # next chunk / decode step
    free(rid)                                                            # finish or preemption

With a host tier, `take_newly_cached()` hands the blocks registered since the last call to the
tier, which copies them out while `pin()` keeps them from reuse (`unpin()` when the copy ended).
A keyed session's latest blocks are retained (`retain_session`): evicted after anonymous ones.

A request's slot for token position p is `table[p // block_size] * block_size + p % block_size`.
The manager assumes it is the pool's only user, so `check_integrity()` can demand that every
block's refcount equals the number of tables holding it plus its pins.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

from splitserve.shared.kv.block_hash import BlockHash, hash_block_tokens, hash_prompt_blocks
from splitserve.shared.kv.block_pool import BlockPool, _require
from splitserve.shared.kv.retention import SessionRetention


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 track_newly_cached: bool = False):
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self._tables: dict[str, list[int]] = {}
        # Chained hashes of each request's leading full computed blocks, registered so far.
        self._block_hashes: dict[str, list[BlockHash]] = {}
        self.prefix_queries_tokens = 0
        self.prefix_hits_tokens = 0
        self.track_newly_cached = track_newly_cached
        self._newly_cached: list[tuple[int, BlockHash]] = []
        self._pins: Counter[int] = Counter()
        self.sessions = SessionRetention(self.pool.retain_hashes)
        # A numpy mirror of the tables, one row per request, written as tables grow, so a step's
        # [B, width] block-table array is one gather instead of a Python pass over every entry.
        self._rows = np.zeros((16, 64), np.int32)
        self._row_of: dict[str, int] = {}
        self._free_rows = list(range(15, -1, -1))

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by some request."""
        return 1.0 - self.pool.num_free_blocks / self.pool.num_blocks

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits_tokens / self.prefix_queries_tokens if self.prefix_queries_tokens else 0.0

    @property
    def request_ids(self) -> set[str]:
        """The requests that hold a table here."""
        return set(self._tables)

    def block_ids(self, request_id: str) -> list[int]:
        return list(self._tables.get(request_id, ()))

    def block_table(self, request_id: str) -> list[int]:
        """The request's live block table (no copy, for the per-step hot path): do not modify."""
        return self._tables.get(request_id, [])

    def block_table_array(self, request_ids: Sequence[str]) -> np.ndarray:
        """`[len(request_ids), longest table]` int32, row i the table of request_ids[i], zero-padded."""
        rows = [self._row_of[request_id] for request_id in request_ids]
        # map, not a generator: no Python-level call per request on the per-step path
        width = max(map(len, map(self._tables.__getitem__, request_ids)), default=0)
        return self._rows[rows, :width]

    def num_blocks_needed(self, request_id: str, num_total_tokens: int) -> int:
        """Blocks to add to the request's table so it covers `num_total_tokens` slots."""
        num_held = len(self._tables.get(request_id, ()))
        return max(0, -(-num_total_tokens // self.block_size) - num_held)

    def get_computed_blocks(self, token_ids: Sequence[int], record_stats: bool = True,
                            block_hashes: Sequence[BlockHash] | None = None) -> tuple[list[int], int]:
        """Leading full blocks of `token_ids` already in the prefix cache: (block_ids, num_tokens).

        Takes no references. Leaves at least one token to compute, since the model must run on
        the last prompt token to produce logits. Counts toward the hit-rate stats on every call.
        `block_hashes`: the chained hashes of token_ids' full blocks (`lookup_hashes`), when the
        caller has them, so that a long cached prefix is not hashed again here.
        """
        if not self.enable_prefix_caching:
            return [], 0
        hit_blocks: list[int] = []
        for block_hash in self.lookup_hashes(token_ids) if block_hashes is None else block_hashes:
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            hit_blocks.append(block_id)
        num_hit_tokens = len(hit_blocks) * self.block_size
        if record_stats:
            self.record_prefix_query(len(token_ids), num_hit_tokens)
        return hit_blocks, num_hit_tokens

    def lookup_hashes(self, token_ids: Sequence[int]) -> list[BlockHash]:
        """Chained hashes of the blocks a prefix hit of `token_ids` may cover (every full block
        but one that holds the last token, which must be computed for its logits)."""
        bs = self.block_size
        return hash_prompt_blocks(token_ids[: max(0, len(token_ids) - 1) // bs * bs], bs)

    def record_prefix_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Count one prefix-cache lookup in the hit-rate stats (callers that may retry a lookup
        pass record_stats=False to get_computed_blocks and count only the one that was used)."""
        self.prefix_queries_tokens += num_tokens
        self.prefix_hits_tokens += num_hit_tokens

    def allocate_slots(
        self,
        request_id: str,
        token_ids: Sequence[int],
        num_computed_tokens: int,
        num_new_tokens: int,
        new_computed_blocks: Sequence[int] = (),
        block_hashes: Sequence[BlockHash] | None = None,
    ) -> list[int] | None:
        """Grow the request's table to cover `num_computed_tokens + num_new_tokens` slots.

        `num_computed_tokens` includes the prefix-hit tokens of `new_computed_blocks`, which are
        adopted as the table's head and are only accepted while the table is empty. Returns a copy
        of the whole table, or None when the pool is short, in which case nothing changed.
        `block_hashes`: token_ids' chained block hashes (at least the hit's), as the lookup had them.
        """
        if num_computed_tokens < 0 or num_new_tokens < 0:
            raise ValueError(f"token counts must be >= 0: {num_computed_tokens} computed, {num_new_tokens} new")
        if num_computed_tokens > len(token_ids):
            raise ValueError(f"{num_computed_tokens} computed tokens but only {len(token_ids)} token ids")
        table = self._tables.get(request_id, [])
        hit_hashes: list[BlockHash] = []
        if new_computed_blocks:
            hit_hashes = self._verify_hit(request_id, token_ids, num_computed_tokens, new_computed_blocks, block_hashes)
        if not self.has_room(request_id, num_computed_tokens + num_new_tokens, new_computed_blocks):
            return None
        num_new_blocks = self.num_blocks_needed(request_id, num_computed_tokens + num_new_tokens)
        num_new_blocks = max(0, num_new_blocks - len(new_computed_blocks))
        # first, so allocate() cannot evict the hits
        self.pool.incref([b for b in new_computed_blocks if not self._is_placeholder(b)])
        num_before = len(table)
        table.extend(new_computed_blocks)
        table.extend(self.pool.allocate(num_new_blocks))
        self._tables[request_id] = table
        self._mirror(request_id, table, num_before)
        self._block_hashes.setdefault(request_id, []).extend(hit_hashes)
        return list(table)

    def allocate_load_slots(self, request_id: str, token_ids: Sequence[int], num_tokens: int) -> list[int] | None:
        """The blocks a load of the first `num_tokens` tokens' KV from elsewhere fills (another
        engine's or the host tier's), allocated; None when the pool is short (nothing changed)."""
        return self.allocate_slots(request_id, token_ids, 0, num_tokens)

    def prompt_block_ids(self, request_id: str, num_tokens: int) -> list[int]:
        """The blocks holding the first `num_tokens` tokens' KV, to hand to another engine."""
        return self.block_ids(request_id)[: -(-num_tokens // self.block_size)]

    sends_window_blocks_only = False
    """Whether a held prompt hands out only the blocks its windows still see (a pool split by
    layer group), so the window may release the rest as usual; else every block is kept."""

    def group_free_blocks(self) -> list[int]:
        """Free blocks of each KV layer group's pool (one pool: one entry)."""
        return [self.num_free_blocks]

    def has_room(self, request_id: str, num_total_tokens: int, new_computed_blocks: Sequence[int] = ()) -> bool:
        """Whether `allocate_slots` can cover `num_total_tokens` slots (adopting these hit blocks)."""
        num_new_blocks = max(0, self.num_blocks_needed(request_id, num_total_tokens) - len(new_computed_blocks))
        # An evictable hit block (refcount 0) is counted as free; adopting it uses it up.
        num_evictable_hits = sum(1 for b in set(new_computed_blocks)
                                 if not self._is_placeholder(b) and self.pool.refcount(b) == 0)
        return num_new_blocks + num_evictable_hits <= self.pool.num_free_blocks

    def _is_placeholder(self, block_id: int) -> bool:
        """A table entry that holds no KV of its own (sliding windows: the null block)."""
        return False

    def hit_bound(self, block_hashes: Sequence[BlockHash]) -> int:
        """The most leading blocks of these chained hashes a hit here can cover: the cached prefix."""
        n = 0
        while n < len(block_hashes) and self.pool.lookup(block_hashes[n]) is not None:
            n += 1
        return n

    def hit_blocks(self, block_hashes: Sequence[BlockHash], num_blocks: int) -> list[int] | None:
        """The table head a hit of the first `num_blocks` blocks adopts here, or None if this pool
        cannot serve it (full attention: every block of the prefix must be cached)."""
        blocks = [self.pool.lookup(h) for h in block_hashes[:num_blocks]]
        return None if None in blocks else blocks

    def block_table_arrays(self, request_ids: Sequence[str]) -> list[np.ndarray]:
        """One block-table array per KV layer group (see layer_groups.py); here the one pool's."""
        return [self.block_table_array(request_ids)]

    def cache_computed_blocks(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Register the hash of every block newly filled by computed tokens (O(new blocks))."""
        if request_id not in self._tables:
            raise KeyError(f"unknown request {request_id!r}")
        if not self.enable_prefix_caching:
            return
        table, hashes = self._tables[request_id], self._block_hashes[request_id]
        if num_computed_tokens > min(len(token_ids), len(table) * self.block_size):
            raise ValueError(
                f"request {request_id!r}: {num_computed_tokens} computed tokens exceed its "
                f"{len(token_ids)} token ids or {len(table)} blocks"
            )
        bs = self.block_size
        for i in range(len(hashes), num_computed_tokens // bs):
            self._register(table, hashes, hash_block_tokens(hashes[-1] if hashes else None, token_ids[i * bs : (i + 1) * bs]))

    def adopt_block_hashes(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int,
                           block_hashes: Sequence[BlockHash]) -> bool:
        """Register a loaded request's full blocks under the chained hashes its sender computed
        over the same tokens (a P/D hand-off: the prompt is not hashed twice). Refused (False:
        `cache_computed_blocks` then hashes them) unless there is one hash per full block of the
        computed tokens, none registered yet, and the first and last hashes match the tokens here
        (two blocks hashed, not the prompt), so a handle paired with another prompt is caught."""
        if not self.enable_prefix_caching:
            return True
        table, hashes = self._tables.get(request_id), self._block_hashes.get(request_id)
        n = len(block_hashes)
        if table is None or hashes or n == 0 or n != num_computed_tokens // self.block_size or n > len(table):
            return False
        if not self._ends_match(token_ids, block_hashes):
            return False
        for block_hash in block_hashes:
            self._register(table, hashes, block_hash)
        return True

    def _ends_match(self, token_ids: Sequence[int], block_hashes: Sequence[BlockHash]) -> bool:
        bs, n = self.block_size, len(block_hashes)
        if hash_block_tokens(None, token_ids[:bs]) != block_hashes[0]:
            return False
        parent = block_hashes[-2] if n > 1 else None
        return hash_block_tokens(parent, token_ids[(n - 1) * bs : n * bs]) == block_hashes[-1]

    def _register(self, table: list[int], hashes: list[BlockHash], block_hash: BlockHash) -> None:
        """Block len(hashes) of `table` is full and holds the KV `block_hash` names."""
        block_id = table[len(hashes)]
        if self.pool.cache_block(block_id, block_hash) and self.track_newly_cached:
            self._newly_cached.append((block_id, block_hash))
        hashes.append(block_hash)

    def block_hashes(self, request_id: str) -> list[BlockHash]:
        """Chained hashes of the request's full computed blocks registered so far."""
        return list(self._block_hashes.get(request_id, ()))

    def take_newly_cached(self) -> list[tuple[int, BlockHash]]:
        """(block_id, hash) of every block registered since the last call that is still cached."""
        taken, self._newly_cached = self._newly_cached, []
        return [(b, h) for b, h in taken if self.pool.cached_hash(b) == h]

    def pin(self, block_ids: Iterable[int]) -> None:
        """Hold a reference that is no request's (a copy out of the block is in flight)."""
        block_ids = list(block_ids)
        self.pool.incref(block_ids)
        self._pins.update(block_ids)

    def unpin(self, block_ids: Iterable[int]) -> None:
        block_ids = list(block_ids)
        for block_id, count in Counter(block_ids).items():
            if count > self._pins[block_id]:
                raise ValueError(f"block {block_id} unpinned more often than pinned")
        self._pins.subtract(block_ids)
        self._pins += Counter()  # drop zero counts
        self.pool.free(block_ids)

    @property
    def num_pinned_blocks(self) -> int:
        return len(self._pins)

    def retain_session(self, key: str, block_hashes: list[BlockHash], until_s: float) -> None:
        """Retain a keyed session's latest blocks until `until_s` (see retention.py)."""
        self.sessions.retain(key, block_hashes, until_s)

    def free(self, request_id: str) -> None:
        """Release the request's blocks tail first, so its tail is evicted before its prefix."""
        table = self._tables.pop(request_id, None)
        self._block_hashes.pop(request_id, None)
        row = self._row_of.pop(request_id, None)
        if row is not None:
            self._rows[row, : len(table)] = 0
            self._free_rows.append(row)
        if table:
            self.pool.free(reversed(table))

    def _mirror(self, request_id: str, table: list[int], start: int) -> None:
        """Copy table[start:] into the request's row of the numpy mirror, growing it as needed."""
        row = self._row_of.get(request_id)
        if row is None:
            if not self._free_rows:
                n = self._rows.shape[0]
                self._rows = np.concatenate([self._rows, np.zeros_like(self._rows)])
                self._free_rows = list(range(2 * n - 1, n - 1, -1))
            row = self._row_of[request_id] = self._free_rows.pop()
        if len(table) > self._rows.shape[1]:
            width = 1 << (len(table) - 1).bit_length()
            self._rows = np.pad(self._rows, ((0, 0), (0, width - self._rows.shape[1])))
        self._rows[row, start : len(table)] = table[start:]

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()

    def check_integrity(self) -> None:
        """Pool invariants, plus: no table holds a block twice, each block's refcount equals the
        number of tables holding it, and every hash a request registered matches the pool's."""
        self.pool.check_integrity()
        holders = Counter(b for table in self._tables.values() for b in table) + self._pins
        for request_id, table in self._tables.items():
            _require(len(set(table)) == len(table), f"request {request_id!r} holds a block twice: {table}")
            row = self._row_of.get(request_id)
            _require(row is not None and self._rows[row, : len(table)].tolist() == table
                     and not self._rows[row, len(table):].any(),
                     f"request {request_id!r}: the numpy mirror of its table is stale")
        _require(len(self._row_of) == len(self._tables), "the numpy mirror holds rows of freed requests")
        for block_id in range(self.pool.num_blocks):
            refcount = self.pool.refcount(block_id)
            held = holders[block_id]
            _require(refcount == held, f"block {block_id}: refcount {refcount} but held by {held} tables and pins")
        for request_id, hashes in self._block_hashes.items():
            table = self._tables[request_id]
            _require(len(hashes) <= len(table), f"request {request_id!r} hashed more blocks than it holds")
            for block_id, block_hash in zip(table, hashes):
                cached = self.pool.cached_hash(block_id)
                _require(cached in (None, block_hash), f"{request_id!r}: block {block_id} holds another hash")

    def _verify_hit(
        self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int, hit_blocks: Sequence[int],
        block_hashes: Sequence[BlockHash] | None = None,
    ) -> list[BlockHash]:
        """Check that `hit_blocks` still hold this request's leading blocks; return their hashes.

        Guards against a stale hit (a block evicted and reused between `get_computed_blocks` and
        this call), which would otherwise silently serve another prompt's KV. With the lookup's
        `block_hashes` the blocks are checked against them instead of hashing the prefix again.
        """
        if self._tables.get(request_id):
            raise ValueError(f"request {request_id!r} already holds blocks; hits are adopted on first allocation only")
        if len(hit_blocks) * self.block_size > num_computed_tokens:
            raise ValueError(
                f"{len(hit_blocks)} hit blocks cover more than the {num_computed_tokens} computed tokens"
            )
        bs = self.block_size
        if block_hashes is not None and len(block_hashes) < len(hit_blocks):
            raise ValueError(f"{len(block_hashes)} block hashes for a hit of {len(hit_blocks)} blocks")
        hashes = (list(block_hashes[: len(hit_blocks)]) if block_hashes is not None
                  else hash_prompt_blocks(token_ids[: len(hit_blocks) * bs], bs))
        for i, block_id in enumerate(hit_blocks):
            if not self._is_placeholder(block_id) and self.pool.cached_hash(block_id) != hashes[i]:
                raise ValueError(f"stale prefix hit: block {block_id} no longer holds block {i} of {request_id!r}")
        return hashes
