"""BlockPool: unit tests, a model-checked state machine, and block-hash determinism."""

from __future__ import annotations

import hashlib
import struct
import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from splitserve.shared.kv import BlockPool, NoFreeBlocksError, hash_block_tokens, hash_prompt_blocks

H1, H2, H3 = b"h1", b"h2", b"h3"


def test_allocate_takes_distinct_blocks_at_refcount_one():
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    assert len(set(blocks)) == 3 and all(pool.refcount(b) == 1 for b in blocks)
    assert pool.num_free_blocks == 1
    assert 0 in blocks  # block 0 is an ordinary block, not a reserved null block
    pool.check_integrity()


def test_allocate_too_many_raises_and_leaves_pool_unchanged():
    pool = BlockPool(4)
    held = pool.allocate(2)
    pool.cache_block(held[0], H1)
    pool.free(held[:1])  # free: 2 never-cached blocks + 1 evictable cached block
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(4)
    assert pool.num_free_blocks == 3
    assert pool.lookup(H1) == held[0]  # the failed call evicted nothing
    assert [pool.refcount(b) for b in range(4)] == [1 if b == held[1] else 0 for b in range(4)]
    pool.check_integrity()


def test_free_returns_uncached_block_and_keeps_cached_one_evictable():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.cache_block(a, H1)
    pool.free([a, b])
    assert pool.num_free_blocks == 2
    assert pool.lookup(H1) == a and pool.cached_hash(a) == H1
    assert pool.lookup(H2) is None and pool.cached_hash(b) is None
    pool.check_integrity()


def test_allocate_prefers_never_cached_blocks_then_evicts_lru():
    pool = BlockPool(4)
    a, b, c, d = pool.allocate(4)
    pool.cache_block(a, H1)
    pool.cache_block(b, H2)
    pool.free([b, a])  # b freed first: least recently used
    pool.free([c])
    assert pool.allocate(1) == [c]  # the uncached block before any eviction
    assert pool.allocate(1) == [b]  # then the least recent cached block; its hash is dropped
    assert pool.lookup(H2) is None and pool.cached_hash(b) is None
    assert pool.lookup(H1) == a
    pool.check_integrity()


def test_incref_of_evictable_block_removes_it_from_eviction():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.cache_block(a, H1)
    pool.free([a])
    assert pool.num_free_blocks == 1
    pool.incref([a])  # a prefix hit adopts the cached block
    assert pool.refcount(a) == 1 and pool.num_free_blocks == 0
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(1)
    pool.check_integrity()


def test_fork_needs_every_reference_freed():
    pool = BlockPool(2)
    (a,) = pool.allocate(1)
    pool.incref([a])
    pool.free([a])
    assert pool.refcount(a) == 1 and pool.num_free_blocks == 1
    pool.free([a])
    assert pool.num_free_blocks == 2


def test_double_free_raises_and_changes_nothing():
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    with pytest.raises(ValueError, match="double free"):
        pool.free([a, b, b])
    assert pool.refcount(a) == 1 and pool.refcount(b) == 1
    pool.free([a])
    with pytest.raises(ValueError, match="double free"):
        pool.free([a])
    pool.check_integrity()


def test_incref_of_free_block_and_bad_ids_raise():
    pool = BlockPool(2)
    with pytest.raises(ValueError, match="is free"):
        pool.incref([0])
    with pytest.raises(ValueError, match="out of range"):
        pool.free([2])
    with pytest.raises(ValueError, match="negative"):
        pool.allocate(-1)


def test_cache_block_keeps_existing_mapping_and_needs_a_reference():
    pool = BlockPool(3)
    a, b, c = pool.allocate(3)
    pool.cache_block(a, H1)
    pool.cache_block(b, H1)  # duplicate content: the first mapping wins, no error
    assert pool.lookup(H1) == a and pool.cached_hash(b) is None
    pool.cache_block(a, H1)  # idempotent
    with pytest.raises(ValueError, match="different hash"):
        pool.cache_block(a, H2)
    pool.free([c])
    with pytest.raises(ValueError, match="not in use"):
        pool.cache_block(c, H3)
    pool.free([b])
    assert pool.allocate(1) == [c]  # b went to the back of the free list, uncached
    pool.check_integrity()


def test_caching_disabled_registers_nothing():
    pool = BlockPool(2, enable_caching=False)
    (a,) = pool.allocate(1)
    pool.cache_block(a, H1)
    assert pool.lookup(H1) is None
    pool.free([a])
    pool.check_integrity()


def test_reset_prefix_cache_refused_while_blocks_in_use():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.cache_block(a, H1)
    pool.free([a])
    assert pool.reset_prefix_cache() is False and pool.lookup(H1) == a
    pool.free([b])
    assert pool.reset_prefix_cache() is True
    assert pool.lookup(H1) is None and pool.num_free_blocks == 2 and pool.num_cached_blocks == 0
    pool.check_integrity()


def test_check_integrity_detects_corruption():
    pool = BlockPool(3)
    (a,) = pool.allocate(1)
    pool._free.append(a)  # a referenced block on the free list
    with pytest.raises(AssertionError, match="free but referenced"):
        pool.check_integrity()


def test_block_hash_chains_and_skips_partial_block():
    tokens = list(range(10))
    hashes = hash_prompt_blocks(tokens, 4)
    assert len(hashes) == 2
    assert hashes[0] == hash_block_tokens(None, tokens[:4])
    assert hashes[1] == hash_block_tokens(hashes[0], tokens[4:8])
    assert hash_block_tokens(None, tokens[4:8]) != hashes[1]  # parent matters
    assert hash_prompt_blocks([0, 1, 2, 3, 9, 9, 9, 9], 4)[0] == hashes[0]
    with pytest.raises(ValueError, match="int64"):
        hash_block_tokens(None, [2**63])


def test_block_hash_is_the_same_in_another_process():
    tokens = [5, 17, 2**40, 0, 31999, 7, 7, 1]
    code = (
        "from splitserve.shared.kv.block_hash import hash_prompt_blocks;"
        f"print(','.join(h.hex() for h in hash_prompt_blocks({tokens!r}, 2)))"
    )
    # A different hash seed would change Python's hash(); ours must not depend on it.
    env = {"PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ",".join(h.hex() for h in hash_prompt_blocks(tokens, 2))


def test_block_hash_wire_format():
    """The format other machines (gateway, remote engines) must reproduce: blake2b-128 over the
    parent digest (a fixed tag for the first block) and the tokens as little-endian int64."""
    first = hashlib.blake2b(b"splitserve/kv-block/v1" + struct.pack("<2q", 3, -1), digest_size=16).digest()
    second = hashlib.blake2b(first + struct.pack("<2q", 2**40, 0), digest_size=16).digest()
    assert hash_prompt_blocks([3, -1, 2**40, 0, 5], 2) == [first, second]


class BlockPoolMachine(RuleBasedStateMachine):
    """Drives a small pool against a reference model of holders, hashes, LRU order and session
    retention (evictable blocks of retained hashes are evicted after all anonymous ones)."""

    NUM_BLOCKS = 6

    def __init__(self):
        super().__init__()
        self.pool = BlockPool(self.NUM_BLOCKS)
        self.holders: dict[int, list[int]] = {}  # holder id -> blocks it references
        self.next_holder = 0
        self.free_fifo: list[int] = list(range(self.NUM_BLOCKS))  # model of the free list
        self.lru: list[int] = []  # model of evictable cached blocks, least recent first
        self.lru_retained: list[int] = []  # the same for blocks whose hash a session retains
        self.retained: Counter = Counter()
        self.hash_of: dict[int, bytes] = {}

    def model_refcounts(self) -> Counter:
        return Counter(b for blocks in self.holders.values() for b in blocks)

    def take(self, n: int) -> list[int]:
        expected = (self.free_fifo + self.lru + self.lru_retained)[:n]
        refs = self.model_refcounts()
        got = self.pool.allocate(n)
        assert got == expected
        assert not any(refs[b] for b in got), "allocate handed out a block another holder references"
        for b in got:
            if b in self.free_fifo:
                self.free_fifo.remove(b)
            else:
                self.evictable_of(b).remove(b)
                del self.hash_of[b]
        return got

    def evictable_of(self, b: int) -> list[int]:
        return self.lru_retained if b in self.lru_retained else self.lru

    def num_free(self) -> int:
        return len(self.free_fifo) + len(self.lru) + len(self.lru_retained)

    @rule(n=st.integers(0, 4))
    def allocate(self, n):
        if n > self.num_free():
            with pytest.raises(NoFreeBlocksError):
                self.pool.allocate(n)
            return
        self.holders[self.next_holder] = self.take(n)
        self.next_holder += 1

    @precondition(lambda self: self.holders)
    @rule(data=st.data(), n=st.integers(1, 3))
    def append(self, data, n):
        holder = data.draw(st.sampled_from(sorted(self.holders)))
        if n <= self.num_free():
            self.holders[holder] += self.take(n)

    @precondition(lambda self: self.holders)
    @rule(data=st.data())
    def fork(self, data):
        holder = data.draw(st.sampled_from(sorted(self.holders)))
        self.pool.incref(self.holders[holder])
        self.holders[self.next_holder] = list(self.holders[holder])
        self.next_holder += 1

    @precondition(lambda self: self.holders)
    @rule(data=st.data())
    def free(self, data):
        holder = data.draw(st.sampled_from(sorted(self.holders)))
        blocks = self.holders.pop(holder)
        self.pool.free(reversed(blocks))
        refs = self.model_refcounts()
        for b in reversed(blocks):
            if refs[b] == 0 and b not in self.lru + self.lru_retained + self.free_fifo:
                if b not in self.hash_of:
                    self.free_fifo.append(b)
                else:
                    (self.lru_retained if self.retained[self.hash_of[b]] else self.lru).append(b)

    @precondition(lambda self: self.holders)
    @rule(data=st.data(), block_hash=st.sampled_from([H1, H2, H3, b"h4"]))
    def cache(self, data, block_hash):
        held = sorted(self.model_refcounts())
        if not held:
            return
        b = data.draw(st.sampled_from(held))
        if b in self.hash_of and self.hash_of[b] != block_hash and block_hash not in self.hash_of.values():
            with pytest.raises(ValueError):
                self.pool.cache_block(b, block_hash)
            return
        self.pool.cache_block(b, block_hash)
        if block_hash not in self.hash_of.values():
            self.hash_of[b] = block_hash

    @rule(block_hash=st.sampled_from([H1, H2, H3, b"h4"]))
    def lookup_and_hit(self, block_hash):
        owner = {h: b for b, h in self.hash_of.items()}.get(block_hash)
        assert self.pool.lookup(block_hash) == owner
        if owner is not None:  # adopt the hit as a new holder, as a prefix-cache hit does
            self.pool.incref([owner])
            if owner in self.lru + self.lru_retained:
                self.evictable_of(owner).remove(owner)
            self.holders[self.next_holder] = [owner]
            self.next_holder += 1

    @rule(block_hash=st.sampled_from([H1, H2, H3, b"h4"]), retain=st.booleans())
    def retain(self, block_hash, retain):
        if not retain and not self.retained[block_hash]:
            return
        before = self.retained[block_hash] > 0
        self.pool.retain_hashes([block_hash], retain)
        self.retained[block_hash] += 1 if retain else -1
        owner = {h: b for b, h in self.hash_of.items()}.get(block_hash)
        if owner is None or before == (self.retained[block_hash] > 0):
            return
        if retain and owner in self.lru:  # newly retained: the recent end of the retained class
            self.lru.remove(owner)
            self.lru_retained.append(owner)
        elif not retain and owner in self.lru_retained:  # expired: evicted next
            self.lru_retained.remove(owner)
            self.lru.insert(0, owner)

    @invariant()
    def pool_matches_model(self):
        self.pool.check_integrity()
        refs = self.model_refcounts()
        assert [self.pool.refcount(b) for b in range(self.NUM_BLOCKS)] == [refs[b] for b in range(self.NUM_BLOCKS)]
        assert self.pool.num_free_blocks == self.NUM_BLOCKS - len(refs) == self.num_free()
        assert self.pool.num_retained_evictable_blocks == len(self.lru_retained)
        assert {b: self.pool.cached_hash(b) for b in self.hash_of} == self.hash_of


BlockPoolMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_block_pool_state_machine = BlockPoolMachine.TestCase
