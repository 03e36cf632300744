"""Tiered KV states, model-checked: blocks on the device, on the host, and in flight between them.

A state machine drives a real KVCacheManager and a real HostTier (its copy thread and a small CPU
cache tensor) the way the engine does: requests compute blocks (each block's content is a value
derived from its hash), newly cached blocks are offloaded and pinned until their copy ends, blocks
come back from the host into fresh device blocks, loads are aborted, sessions retain hashes. After
every step both tiers pass check_integrity(), pins match the copies in flight, and a restored
block holds exactly what was computed for its hash.
"""

from __future__ import annotations

import time

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from splitserve.shared.kv import KVCacheManager
from splitserve.shared.kv.block_hash import hash_prompt_blocks
from splitserve.shared.kv.connector import HostBlocks
from splitserve.shared.offload.host_tier import HostTier

BS, NUM_BLOCKS, NUM_HOST = 2, 8, 5


def value_of(block_hash: bytes) -> float:
    return float(int.from_bytes(block_hash[:2], "little"))


PICK = st.integers(0, 63)
"""Which of the rule's candidates it takes. The candidates depend on the tier's copy threads (what
has landed by now), so a rule draws the same kind of value whatever they are: hypothesis refuses
a strategy whose draws depend on such state (FlakyStrategyDefinition)."""


def _one_of(candidates: list, pick: int):
    return candidates[pick % len(candidates)]


class TieredKVMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.cache = torch.zeros(NUM_BLOCKS, 1, 2, BS, 1, 2)
        self.kv = KVCacheManager(NUM_BLOCKS, BS, track_newly_cached=True)
        self.tier = HostTier(self.cache, NUM_HOST)
        self.next_id = 0
        self.running: dict[str, list[int]] = {}
        self.loading: dict[str, tuple[str, list[bytes]]] = {}  # rid -> (status, hashes)
        self.checked_restores = 0

    def teardown(self):
        self.tier.close()

    def compute(self, rid: str, tokens: list[int]) -> bool:
        if self.kv.allocate_slots(rid, tokens, 0, len(tokens)) is None:
            return False
        for i, block_hash in enumerate(hash_prompt_blocks(tokens, BS)):
            self.cache[self.kv.block_table(rid)[i]] = value_of(block_hash)
        self.kv.cache_computed_blocks(rid, tokens, len(tokens))
        self.running[rid] = tokens
        return True

    @rule(prefix=st.integers(0, 3), n_blocks=st.integers(1, 3))
    def run_request(self, prefix, n_blocks):
        tokens = [prefix] * BS + list(range(self.next_id * 10, self.next_id * 10 + (n_blocks - 1) * BS))
        self.next_id += 1
        self.compute(f"r{self.next_id}", tokens)

    @rule(pick=PICK)
    def finish(self, pick):
        if not self.running:
            return
        rid = _one_of(sorted(self.running), pick)
        del self.running[rid]
        self.kv.free(rid)

    @rule()
    def save(self):
        pairs = self.kv.take_newly_cached()
        self.kv.pin(self.tier.save_blocks([b for b, _ in pairs], [h for _, h in pairs]))

    @rule(pick=PICK)
    def restore(self, pick):
        on_host = sorted(self.tier._slot_of)
        if not on_host:
            return
        block_hash = _one_of(on_host, pick)
        rid = f"load{self.next_id}"
        self.next_id += 1
        assert self.tier.lookup([block_hash]) == 1
        table = self.kv.allocate_slots(rid, [0] * BS, 0, BS)
        if table is None:
            return
        self.tier.start_load(rid, HostBlocks((block_hash,)), table)
        self.loading[rid] = ("loading", [block_hash])

    @rule(pick=PICK)
    def abort(self, pick):
        loading = sorted(r for r, (s, _) in self.loading.items() if s == "loading")
        if not loading:
            return
        rid = _one_of(loading, pick)
        self.tier.abort(rid)
        self.loading[rid] = ("aborted", self.loading[rid][1])

    @rule(key=st.sampled_from(["a", "b"]), picks=st.lists(PICK, max_size=3), ttl_s=st.sampled_from([-1.0, 60.0]))
    def retain(self, key, picks, ttl_s):
        hashes = sorted(self.tier._slot_of)
        chosen = [_one_of(hashes, p) for p in picks] if hashes else []
        self.tier.retain(key, chosen, time.monotonic() + ttl_s)
        self.tier.sessions.expire(time.monotonic())

    @rule(wait=st.booleans())
    def poll(self, wait):
        deadline = time.monotonic() + 10
        while wait and self.tier.num_in_flight and time.monotonic() < deadline:
            self.apply(self.tier.poll())
            time.sleep(0.001)
        self.apply(self.tier.poll())

    def apply(self, events):
        self.kv.unpin(events.saved_block_ids)
        for rid in events.loaded:
            status, hashes = self.loading.pop(rid)
            assert status == "loading", "an aborted load was reported as loaded"
            block_id = self.kv.block_table(rid)[0]
            assert self.cache[block_id].eq(value_of(hashes[0])).all(), "restored block differs"
            self.checked_restores += 1
            self.kv.free(rid)
        for rid, reason in events.load_failed:
            status, _ = self.loading.pop(rid)
            assert reason == "aborted" or status == "loading"
            self.kv.free(rid)

    @invariant()
    def tiers_are_consistent(self):
        self.kv.check_integrity()
        self.tier.check_integrity()
        in_flight = [b for job in self.tier._in_flight.values() if job.kind == "offload" for b in job.device_block_ids]
        assert sorted(self.kv._pins.elements()) == sorted(in_flight)
        assert set(self.tier._loads) == set(self.loading)


TieredKVMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
test_tiered_kv_state_machine = TieredKVMachine.TestCase


def test_offload_then_restore_moves_runs_of_adjacent_blocks():
    cache = torch.arange(8 * 4, dtype=torch.float32).reshape(8, 1, 2, 1, 1, 2)
    tier = HostTier(cache, 8)
    hashes = hash_prompt_blocks(list(range(8)), 2)
    try:
        assert tier.save_blocks([2, 3, 4, 6], hashes) == [2, 3, 4, 6]
        original = cache[[2, 3, 4, 6]].clone()
        assert wait_events(tier).saved_block_ids == [2, 3, 4, 6]
        assert tier.stats()["offload_runs"] == 2  # 2-4 and 6
        cache.zero_()
        assert tier.lookup(hashes) == 4
        tier.start_load("r", HostBlocks(tuple(hashes)), [0, 1, 2, 3])
        assert wait_events(tier).loaded == ["r"]
        assert torch.equal(cache[:4], original) and tier.stats()["restore_runs"] == 1  # host slots 0-3 into blocks 0-3: one copy
    finally:
        tier.close()


def wait_events(tier: HostTier):
    deadline = time.monotonic() + 10
    while tier.num_in_flight and time.monotonic() < deadline:
        time.sleep(0.001)
        events = tier.poll()
        if events:
            return events
    pytest.fail("host copies did not end")
