"""KVCacheManager: unit tests and a state machine that checks prefix hits serve the right KV."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from splitserve.shared.kv import KVCacheManager, hash_prompt_blocks

BS = 4


def run_prompt(kv: KVCacheManager, rid: str, tokens: list[int]) -> list[int] | None:
    """Admit a prompt with its prefix hit, compute it whole, register its blocks."""
    hit_blocks, num_hit = kv.get_computed_blocks(tokens)
    table = kv.allocate_slots(rid, tokens, num_hit, len(tokens) - num_hit, hit_blocks)
    if table is not None:
        kv.cache_computed_blocks(rid, tokens, len(tokens))
    return table


def test_prefix_hit_shares_full_blocks_and_leaves_a_token_to_compute():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    prompt = list(range(8))  # exactly two full blocks
    table_a = run_prompt(kv, "a", prompt)
    assert len(table_a) == 2
    hit_blocks, num_hit = kv.get_computed_blocks(prompt)
    assert (hit_blocks, num_hit) == (table_a[:1], 4)  # capped: the last token must be computed
    hit_blocks, num_hit = kv.get_computed_blocks(prompt + [99])
    assert (hit_blocks, num_hit) == (table_a, 8)
    table_b = kv.allocate_slots("b", prompt + [99], num_hit, 1, hit_blocks)
    assert table_b[:2] == table_a and len(table_b) == 3
    assert [kv.pool.refcount(b) for b in table_a] == [2, 2]
    assert kv.prefix_queries_tokens == 8 + 8 + 9 and kv.prefix_hits_tokens == 0 + 4 + 8
    assert kv.prefix_hit_rate == pytest.approx(12 / 25)
    kv.check_integrity()


def test_failed_allocation_changes_nothing_even_with_an_evictable_hit():
    kv = KVCacheManager(num_blocks=3, block_size=BS)
    prompt = list(range(9))
    run_prompt(kv, "a", prompt)  # 3 blocks; blocks 0 and 1 cached
    kv.free("a")
    hit_blocks, num_hit = kv.get_computed_blocks(prompt)
    assert num_hit == 8 and kv.num_free_blocks == 3
    # The two hits are evictable (counted as free); adopting them leaves 1 free block, 2 needed.
    assert kv.allocate_slots("b", prompt + [1, 2, 3, 4], num_hit, 5, hit_blocks) is None
    assert kv.block_ids("b") == [] and kv.num_free_blocks == 3
    assert all(kv.pool.refcount(b) == 0 for b in range(3))
    assert kv.pool.lookup(hash_prompt_blocks(prompt, BS)[1]) == hit_blocks[1]
    assert kv.allocate_slots("b", prompt, num_hit, 1, hit_blocks) == hit_blocks + [2]
    kv.check_integrity()


def test_adopted_hit_is_not_evicted_by_the_same_allocation():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    p, q = [1] * BS + [0], [2] * BS + [0]
    table_p, table_q = run_prompt(kv, "p", p), run_prompt(kv, "q", q)
    kv.free("p")
    kv.free("q")
    kv.allocate_slots("filler", [0] * 2 * BS, 0, 2 * BS)  # takes the 2 uncached blocks
    hit_blocks, num_hit = kv.get_computed_blocks(p)
    assert hit_blocks == table_p[:1]  # the least recently used evictable block
    table = kv.allocate_slots("p2", p, num_hit, 1, hit_blocks)
    assert table == [table_p[0], table_q[0]]  # the new block evicts q's prefix, not the hit
    assert kv.get_computed_blocks(p)[0] == table_p[:1] and kv.get_computed_blocks(q)[0] == []
    kv.check_integrity()


def test_free_evicts_tail_blocks_before_the_shared_prefix():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    prompt = list(range(13))
    table = run_prompt(kv, "a", prompt)  # 4 blocks, the first 3 cached
    kv.free("a")
    assert kv.allocate_slots("x", [0], 0, 1) == [table[3]]  # the uncached tail block goes first
    assert kv.allocate_slots("y", [0], 0, 1) == [table[2]]  # then the last cached block
    assert kv.get_computed_blocks(prompt)[0] == table[:2]  # the prefix survives
    kv.check_integrity()


def test_decode_growth_and_incremental_caching():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    tokens = [1, 2, 3]
    assert kv.allocate_slots("a", tokens, 0, 3) == [0]
    kv.cache_computed_blocks("a", tokens, 3)
    assert kv.pool.num_cached_blocks == 0
    for t in range(4, 10):  # one decode step per token
        tokens.append(t)
        assert kv.num_blocks_needed("a", len(tokens)) == (1 if len(tokens) % BS == 1 else 0)
        table = kv.allocate_slots("a", tokens, len(tokens) - 1, 1)
        kv.cache_computed_blocks("a", tokens, len(tokens))
    assert len(table) == 3 and kv.pool.num_cached_blocks == 2
    assert kv.usage == pytest.approx(3 / 4)
    kv.free("a")
    kv.free("a")  # unknown id: no-op
    assert kv.num_free_blocks == 4 and kv.usage == 0.0
    assert kv.reset_prefix_cache() and kv.pool.num_cached_blocks == 0


def test_bad_calls_raise_specific_errors():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    prompt = list(range(9))
    table = run_prompt(kv, "a", prompt)
    with pytest.raises(KeyError, match="unknown request"):
        kv.cache_computed_blocks("nope", prompt, 4)
    with pytest.raises(ValueError, match="exceed"):
        kv.cache_computed_blocks("a", prompt, 12)
    with pytest.raises(ValueError, match="already holds blocks"):
        kv.allocate_slots("a", prompt, 8, 1, table[:1])
    with pytest.raises(ValueError, match="cover more"):
        kv.allocate_slots("b", prompt, 0, 9, table[:1])
    with pytest.raises(ValueError, match="stale prefix hit"):
        kv.allocate_slots("b", [7] * 9, 4, 5, table[:1])
    with pytest.raises(ValueError, match=">= 0"):
        kv.allocate_slots("b", prompt, 0, -1)
    kv.check_integrity()


def test_prefix_caching_disabled():
    kv = KVCacheManager(num_blocks=4, block_size=BS, enable_prefix_caching=False)
    run_prompt(kv, "a", list(range(9)))
    assert kv.get_computed_blocks(list(range(9))) == ([], 0)
    assert kv.pool.num_cached_blocks == 0 and kv.prefix_queries_tokens == 0
    kv.free("a")
    kv.check_integrity()


PREFIXES = [[], [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9], [5, 5, 5, 5, 5]]


class KVCacheManagerMachine(RuleBasedStateMachine):
    """Several requests with shared prefixes over a tiny pool. A model of the KV cache contents
    (which token each slot holds) checks that every prefix hit serves exactly the request's tokens."""

    NUM_BLOCKS = 7

    def __init__(self):
        super().__init__()
        self.kv = KVCacheManager(self.NUM_BLOCKS, BS)
        self.slots: dict[int, list[int | None]] = {}  # block id -> token written to each slot
        self.tokens: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}  # tokens whose KV is written
        self.scheduled: dict[str, int] = {}  # tokens with slots allocated
        self.next_id = 0

    def write_kv(self, rid: str, start: int, stop: int) -> None:
        table = self.kv.block_ids(rid)
        for pos in range(start, stop):
            block, offset = table[pos // BS], pos % BS
            assert self.kv.pool.refcount(block) == 1 or self.slots[block][offset] == self.tokens[rid][pos], (
                f"writing into shared block {block}"
            )
            self.slots[block][offset] = self.tokens[rid][pos]

    def note_new_blocks(self, before: list[int], after: list[int]) -> None:
        for block in after[len(before) :]:
            self.slots[block] = [None] * BS  # freshly allocated: contents undefined

    @rule(prefix=st.sampled_from(PREFIXES), suffix=st.lists(st.integers(0, 3), max_size=9), chunk=st.integers(1, 12))
    def add_request(self, prefix, suffix, chunk):
        tokens = prefix + suffix
        if not tokens:
            return
        rid = f"r{self.next_id}"
        self.next_id += 1
        hit_blocks, num_hit = self.kv.get_computed_blocks(tokens)
        assert num_hit == len(hit_blocks) * BS < len(tokens)
        expected_hashes = hash_prompt_blocks(tokens, BS)[: len(hit_blocks)]
        assert [self.kv.pool.cached_hash(b) for b in hit_blocks] == expected_hashes
        for i, block in enumerate(hit_blocks):
            assert self.slots[block] == tokens[i * BS : (i + 1) * BS], "prefix hit serves another prompt's KV"
        num_new = min(chunk, len(tokens) - num_hit)
        free_before = self.kv.num_free_blocks
        refs_before = [self.kv.pool.refcount(b) for b in range(self.NUM_BLOCKS)]
        table = self.kv.allocate_slots(rid, tokens, num_hit, num_new, hit_blocks)
        if table is None:
            assert self.kv.num_free_blocks == free_before and self.kv.block_ids(rid) == []
            assert [self.kv.pool.refcount(b) for b in range(self.NUM_BLOCKS)] == refs_before
            return
        assert table[: len(hit_blocks)] == hit_blocks and len(table) * BS >= num_hit + num_new
        self.note_new_blocks(hit_blocks, table)
        self.tokens[rid], self.computed[rid], self.scheduled[rid] = tokens, num_hit, num_hit + num_new

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), chunk=st.integers(1, 6), new_token=st.integers(0, 3))
    def step(self, data, chunk, new_token):
        """Compute what was scheduled, register full blocks, then schedule the next chunk."""
        rid = data.draw(st.sampled_from(sorted(self.tokens)))
        tokens = self.tokens[rid]
        self.write_kv(rid, self.computed[rid], self.scheduled[rid])
        self.computed[rid] = self.scheduled[rid]
        self.kv.cache_computed_blocks(rid, tokens, self.computed[rid])
        if self.computed[rid] == len(tokens):
            tokens.append(new_token)  # a sampled token: decode one at a time
            chunk = 1
        num_new = min(chunk, len(tokens) - self.computed[rid])
        before = self.kv.block_ids(rid)
        table = self.kv.allocate_slots(rid, tokens, self.computed[rid], num_new)
        if table is None:
            assert self.kv.block_ids(rid) == before
            return
        assert table[: len(before)] == before
        self.note_new_blocks(before, table)
        self.scheduled[rid] = self.computed[rid] + num_new

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        rid = data.draw(st.sampled_from(sorted(self.tokens)))
        self.kv.free(rid)
        for d in (self.tokens, self.computed, self.scheduled):
            del d[rid]

    @rule()
    def free_all(self):
        for rid in list(self.tokens):
            self.kv.free(rid)
        self.tokens.clear(), self.computed.clear(), self.scheduled.clear()
        assert self.kv.num_free_blocks == self.NUM_BLOCKS and self.kv.usage == 0.0

    @invariant()
    def integrity(self):
        self.kv.check_integrity()
        for rid, tokens in self.tokens.items():
            table = self.kv.block_ids(rid)
            assert len(table) * BS >= self.scheduled[rid]
            for block, block_hash in zip(table, hash_prompt_blocks(tokens[: self.computed[rid]], BS)):
                assert self.kv.pool.cached_hash(block) in (None, block_hash)

    def teardown(self):
        for rid in list(self.tokens):
            self.kv.free(rid)
        assert self.kv.num_free_blocks == self.NUM_BLOCKS
        self.kv.check_integrity()


KVCacheManagerMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
test_kv_cache_manager_state_machine = KVCacheManagerMachine.TestCase


def test_a_stale_hit_is_refused_also_when_the_lookup_hashes_are_passed():
    kv = KVCacheManager(4, 2)
    tokens = [1, 2, 3, 4, 5]
    hashes = kv.lookup_hashes(tokens)
    kv.allocate_slots("a", tokens, 0, 5)
    kv.cache_computed_blocks("a", tokens, 4)
    hit, num_hit = kv.get_computed_blocks(tokens, block_hashes=hashes)
    assert num_hit == 4 and hit == kv.block_ids("a")[:2]
    kv.free("a")
    kv.allocate_slots("hog", [9] * 8, 0, 8)  # evicts and reuses every block of a
    with pytest.raises(ValueError, match="stale prefix hit"):
        kv.allocate_slots("b", tokens, num_hit, 1, hit, hashes)
    kv.free("hog")
    kv.check_integrity()


def _count_hashing(monkeypatch) -> list[int]:
    """Counts the block hashes the manager computes itself."""
    from splitserve.shared.kv import kv_cache_manager

    calls, real = [], kv_cache_manager.hash_block_tokens
    monkeypatch.setattr(kv_cache_manager, "hash_block_tokens", lambda *a: calls.append(1) or real(*a))
    return calls


def test_a_loaded_prompt_adopts_the_senders_hashes_and_hashes_only_the_two_it_checks(monkeypatch):
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    prompt = list(range(14))  # three full blocks and a partial one
    table = kv.allocate_load_slots("d", prompt, len(prompt))
    calls = _count_hashing(monkeypatch)
    assert kv.adopt_block_hashes("d", prompt, len(prompt), hash_prompt_blocks(prompt, BS))
    kv.cache_computed_blocks("d", prompt, len(prompt))  # nothing left to hash
    assert len(calls) == 2  # the first block and the last, not the prompt
    assert kv.block_hashes("d") == hash_prompt_blocks(prompt, BS)
    assert kv.get_computed_blocks(prompt + [7]) == (table[:3], 12)
    kv.check_integrity()


def _tampered_last(hashes):
    return hashes[:-1] + [bytes(16)]


@pytest.mark.parametrize("wrong", [
    lambda hashes: hashes[:2],  # one hash short of the full blocks
    lambda hashes: hash_prompt_blocks(list(range(100, 114)), BS),  # another prompt's
    _tampered_last,
    lambda hashes: [],
], ids=["short", "another-prompt", "tampered-last", "none"])
def test_hashes_that_do_not_fit_the_loaded_prompt_are_refused_and_it_is_hashed_here(wrong):
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    prompt = list(range(14))
    kv.allocate_load_slots("d", prompt, len(prompt))
    assert not kv.adopt_block_hashes("d", prompt, len(prompt), wrong(hash_prompt_blocks(prompt, BS)))
    assert kv.block_hashes("d") == []  # nothing registered under a refused hash
    kv.cache_computed_blocks("d", prompt, len(prompt))
    assert kv.block_hashes("d") == hash_prompt_blocks(prompt, BS)
    kv.check_integrity()


def test_without_prefix_caching_adopting_registers_nothing():
    kv = KVCacheManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    prompt = list(range(8))
    kv.allocate_load_slots("d", prompt, len(prompt))
    assert kv.adopt_block_hashes("d", prompt, len(prompt), hash_prompt_blocks(prompt, BS))
    assert kv.block_hashes("d") == [] and kv.get_computed_blocks(prompt + [1]) == ([], 0)
