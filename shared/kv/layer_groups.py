"""KV layer groups: interleaved sliding-window models keep one pool and one block table per group.

A model whose layers do not all attend alike (Gemma 2/3: sliding and global layers; Qwen2/3 with
`max_window_layers`) says so through `model.kv_layer_groups()`: the full-attention layers form one
group, the sliding layers one group per window. Each group has its own block-major pool tensor
`[num_blocks_g, num_layers_g, 2, block_size, Hkv, D]` (engine_parts.py) and here its own manager:

    group 0 ... full attention    KVCacheManager: a request holds every block of its sequence
    group g ... window w          SlidingWindowKVCacheManager: blocks the window slid past go back

so a sliding group needs only about `window / block_size + 2` blocks per running request, however
long the sequence, and its pool is sized for that (`split_layer_blocks`); the full group gets the
rest of the KV memory. `GroupedKVCacheManager` has the manager interface the scheduler and the
engine use: a request gets room only when every group has it (admission and preemption see all
groups), and it is freed from all.

Every group hashes a block's tokens with the same chained hash, and each group's pool keeps its
own hash map. A prefix hit of `n` blocks (L = n * block_size tokens) needs the full group's blocks
[0, L) and each sliding group's blocks of the last `window` tokens before L (the keys a query at
L can still see); a sliding group's table head before them is null entries, adopted as already
released. The longest such L is taken (`get_computed_blocks`).

P/D transfer of a prompt of P tokens (shared/transfer/): the prefill side hands out the full
group's blocks [0, ceil(P / block_size)) and each sliding group's from the first block a query at
P can still see (`prompt_block_ids`); the decode side allocates the same spans, a sliding table's
head before them null entries adopted as released, as for a prefix hit (`allocate_load_slots`).
A sliding group then moves and holds its window's blocks only, however long the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from splitserve.shared.kv.block_hash import BlockHash
from splitserve.shared.kv.block_pool import _require
from splitserve.shared.kv.kv_cache_manager import KVCacheManager
from splitserve.shared.kv.retention import SessionRetention
from splitserve.shared.kv.sliding_window import SlidingWindowKVCacheManager

LayerGroup = tuple[int | None, list[int]]
"""(window or None for full attention, indices of the group's attention layers)."""


def sliding_group_demand(window: int, block_size: int, max_num_seqs: int, max_num_batched_tokens: int) -> int:
    """Blocks a sliding group can need at once: per running request the window's blocks, the one
    being filled and one more (the release runs a step behind under async scheduling), plus two
    steps' new tokens (a prefill chunk is allocated before its window moves) and the null block."""
    per_request = -(-window // block_size) + 2
    return max_num_seqs * per_request + 2 * -(-max_num_batched_tokens // block_size) + 1


def split_layer_blocks(num_layer_blocks: int, groups: Sequence[LayerGroup], block_size: int,
                       max_num_seqs: int, max_num_batched_tokens: int) -> list[int]:
    """Blocks per group from a budget of `num_layer_blocks` one-layer blocks. Each sliding group
    gets what it can need (never more than an equal split would give it); the full-attention
    groups share the rest. Without a full group every group gets the equal split."""
    equal = num_layer_blocks // sum(len(layers) for _, layers in groups)
    if all(window is not None for window, _ in groups):
        return [equal] * len(groups)
    counts = [None if window is None else
              min(equal, sliding_group_demand(window, block_size, max_num_seqs, max_num_batched_tokens))
              for window, _ in groups]
    spare = num_layer_blocks - sum(c * len(layers) for c, (_, layers) in zip(counts, groups) if c is not None)
    num_full_layers = sum(len(layers) for window, layers in groups if window is None)
    return [spare // num_full_layers if c is None else c for c in counts]


class GroupedKVCacheManager:
    """One manager per layer group behind the single-manager interface (see the module docstring).
    Group 0 is the primary: its tables, hashes and free blocks are what callers that think in one
    table (abort bookkeeping, session hashes, load reports) see."""

    track_newly_cached = False  # no host tier with groups (engine.py says why)
    num_pinned_blocks = 0
    sends_window_blocks_only = True

    def __init__(self, windows: Sequence[int | None], num_blocks: Sequence[int], block_size: int,
                 enable_prefix_caching: bool = True):
        if len(windows) != len(num_blocks) or len(windows) < 2:
            raise ValueError(f"need one block count per group and at least two groups: {windows}, {num_blocks}")
        self.groups = [KVCacheManager(n, block_size, enable_prefix_caching) if w is None
                       else SlidingWindowKVCacheManager(n, block_size, w, enable_prefix_caching)
                       for w, n in zip(windows, num_blocks)]
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.prefix_queries_tokens = 0
        self.prefix_hits_tokens = 0
        self.sessions = SessionRetention(self._retain_hashes)

    @property
    def pool(self):
        return self.groups[0].pool

    @property
    def num_free_blocks(self) -> int:
        return self.groups[0].num_free_blocks

    @property
    def usage(self) -> float:
        """The fullest group's usage: a request needs room in every group."""
        return max(g.usage for g in self.groups)

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits_tokens / self.prefix_queries_tokens if self.prefix_queries_tokens else 0.0

    def block_ids(self, request_id: str) -> list[int]:
        return self.groups[0].block_ids(request_id)

    def block_table(self, request_id: str) -> list[int]:
        return self.groups[0].block_table(request_id)

    def block_table_arrays(self, request_ids: Sequence[str]) -> list[np.ndarray]:
        return [g.block_table_array(request_ids) for g in self.groups]

    def block_hashes(self, request_id: str) -> list[BlockHash]:
        return self.groups[0].block_hashes(request_id)

    def num_blocks_needed(self, request_id: str, num_total_tokens: int) -> int:
        return max(g.num_blocks_needed(request_id, num_total_tokens) for g in self.groups)

    def lookup_hashes(self, token_ids: Sequence[int]) -> list[BlockHash]:
        return self.groups[0].lookup_hashes(token_ids)

    def get_computed_blocks(self, token_ids: Sequence[int], record_stats: bool = True,
                            block_hashes: Sequence[BlockHash] | None = None):
        """(one hit head per group, num_tokens) for the longest prefix every group can serve;
        ((), 0) when none. Takes no references; leaves at least one token to compute.
        `block_hashes`: `lookup_hashes(token_ids)`, when the caller has them."""
        hit, num_hit_tokens = (), 0
        if self.enable_prefix_caching:
            bs = self.block_size
            hashes = self.lookup_hashes(token_ids) if block_hashes is None else block_hashes
            for num_blocks in range(min(g.hit_bound(hashes) for g in self.groups), 0, -1):
                heads = self._hit_heads(hashes, num_blocks)
                if heads is not None:
                    hit, num_hit_tokens = heads, num_blocks * bs
                    break
        if record_stats:
            self.record_prefix_query(len(token_ids), num_hit_tokens)
        return hit, num_hit_tokens

    def _hit_heads(self, hashes: list[BlockHash], num_blocks: int) -> tuple[list[int], ...] | None:
        """Every group's head for a hit of `num_blocks`, or None. The groups are asked last to
        first, so the sliding ones (a window's lookups) turn a length down before the full group
        (the whole prefix's) is asked; within the bound the full group always serves it."""
        heads = []
        for g in reversed(self.groups):
            head = g.hit_blocks(hashes, num_blocks)
            if head is None:
                return None
            heads.append(head)
        return tuple(reversed(heads))

    def record_prefix_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queries_tokens += num_tokens
        self.prefix_hits_tokens += num_hit_tokens

    def allocate_slots(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int,
                       num_new_tokens: int, new_computed_blocks: Sequence[Sequence[int]] = (),
                       block_hashes: Sequence[BlockHash] | None = None) -> list[int] | None:
        """Grow every group's table, or none when one group is short (then nothing changed);
        `new_computed_blocks` is a hit from `get_computed_blocks`. Returns group 0's table."""
        heads = new_computed_blocks or [()] * len(self.groups)
        total = num_computed_tokens + num_new_tokens
        if not all(g.has_room(request_id, total, head) for g, head in zip(self.groups, heads)):
            return None
        tables = [g.allocate_slots(request_id, token_ids, num_computed_tokens, num_new_tokens, head, block_hashes)
                  for g, head in zip(self.groups, heads)]
        return tables[0]

    def allocate_load_slots(self, request_id: str, token_ids: Sequence[int], num_tokens: int) -> list[list[int]] | None:
        """Every group's blocks a load of the first `num_tokens` tokens fills, one list per group
        (a sliding group's from its window's first block: the head is null entries); None when a
        group is short (then nothing changed)."""
        heads = [self._dead_head(g, num_tokens) for g in self.groups]
        if not all(g.has_room(request_id, num_tokens, head) for g, head in zip(self.groups, heads)):
            return None
        return [g.allocate_slots(request_id, token_ids, len(head) * self.block_size,
                                 num_tokens - len(head) * self.block_size, head)[len(head):]
                for g, head in zip(self.groups, heads)]

    def prompt_block_ids(self, request_id: str, num_tokens: int) -> list[list[int]]:
        """Every group's blocks a query after `num_tokens` tokens can still read, one list per
        group, each ending at the prompt's last block: what a decode engine needs of the prompt."""
        end = -(-num_tokens // self.block_size)
        return [g.block_ids(request_id)[len(self._dead_head(g, num_tokens)):end] for g in self.groups]

    @staticmethod
    def _dead_head(group: KVCacheManager, num_tokens: int) -> list[int]:
        """Null entries for a sliding group's blocks no query after `num_tokens` tokens sees."""
        if not isinstance(group, SlidingWindowKVCacheManager):
            return []
        return [group.null_block] * group.num_dead_blocks(num_tokens)

    def group_free_blocks(self) -> list[int]:
        return [g.num_free_blocks for g in self.groups]

    def cache_computed_blocks(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        for g in self.groups:
            g.cache_computed_blocks(request_id, token_ids, num_computed_tokens)

    def adopt_block_hashes(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int,
                           block_hashes: Sequence[BlockHash]) -> bool:
        return all([g.adopt_block_hashes(request_id, token_ids, num_computed_tokens, block_hashes)
                    for g in self.groups])

    def release_out_of_window(self, request_id: str, num_computed_tokens: int) -> int:
        """Free the sliding groups' blocks their windows slid past; how many, over all groups."""
        return sum(g.release_out_of_window(request_id, num_computed_tokens)
                   for g in self.groups if isinstance(g, SlidingWindowKVCacheManager))

    def free(self, request_id: str) -> None:
        for g in self.groups:
            g.free(request_id)

    def retain_session(self, key: str, block_hashes: list[BlockHash], until_s: float) -> None:
        self.sessions.retain(key, block_hashes, until_s)

    def _retain_hashes(self, block_hashes: Sequence[BlockHash], retained: bool) -> None:
        for g in self.groups:
            g.pool.retain_hashes(block_hashes, retained)

    def take_newly_cached(self) -> list:
        return []

    def reset_prefix_cache(self) -> bool:
        """Refused while a request holds blocks (then it holds some in every group)."""
        return all([g.reset_prefix_cache() for g in self.groups])

    def check_integrity(self) -> None:
        """Every group's invariants, and every group holds tables for the same requests."""
        for g in self.groups:
            g.check_integrity()
        requests = [g.request_ids for g in self.groups]
        _require(all(r == requests[0] for r in requests), f"groups hold different requests: {requests}")
