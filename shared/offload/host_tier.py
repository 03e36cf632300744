"""`HostTier`: a `KVConnector` that keeps KV blocks in host memory, keyed by their chained hashes.

    save_blocks   every newly computed full block is copied to a host slot (write-through, once
                  per hash): when the device pool later evicts it, the host copy remains
    lookup        leading block hashes of a waiting request (after its device hits) held here
    start_load    copies those slots into the request's freshly allocated device blocks
    poll          offloads that ended (unpin their device blocks), restores that ended (loaded or
                  load_failed: the engine recomputes a failed restore)

A host slot is free, cached (LRU, in two classes like the device pool: anonymous, then retained
by a keyed session), or pinned while a copy reads or writes it; a pinned slot is never evicted.
Copies are batched by runs of adjacent blocks on both sides and run on `BlockCopier`'s thread; this
object's bookkeeping runs on the engine thread only, so nothing here blocks the step loop.

Sizing: a host block takes the same bytes as a device block (num_layers x 2 x block_size x
num_kv_heads x head_dim x dtype bytes); see docs/architecture.md for the rule of thumb.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Sequence

import torch

from splitserve.shared.kv.block_hash import BlockHash
from splitserve.shared.kv.connector import HostBlocks, KVConnectorEvents
from splitserve.shared.kv.retention import SessionRetention
from splitserve.shared.offload.copier import BlockCopier, CopyJob

logger = logging.getLogger(__name__)

COUNTERS = ("host_lookup_blocks", "host_hit_blocks", "offload_blocks", "offload_runs", "offload_us_total",
            "offload_skipped_blocks", "offloads_failed", "host_evicted_blocks", "restores", "restore_blocks",
            "restore_runs", "restore_bytes", "restore_us_total", "restores_failed", "restores_aborted")
"""The tier's monotonic totals (GetLoad counters, so /metrics): hits, copies, their time, failures."""


class HostTier:
    def __init__(self, kv_cache: torch.Tensor, num_host_blocks: int) -> None:
        if num_host_blocks <= 0:
            raise ValueError(f"the host tier needs at least one block, got {num_host_blocks}")
        self._device = kv_cache
        pin = kv_cache.device.type == "cuda"
        self._host = torch.empty((num_host_blocks, *kv_cache.shape[1:]), dtype=kv_cache.dtype, pin_memory=pin)
        self.num_blocks = num_host_blocks
        self.block_bytes = self._host[0].numel() * self._host.element_size()
        self._free_slots = list(range(num_host_blocks - 1, -1, -1))
        self._slot_of: dict[BlockHash, int] = {}
        self._hash_of_slot: dict[int, BlockHash] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()
        self._lru_retained: OrderedDict[int, None] = OrderedDict()
        self._retained: Counter[BlockHash] = Counter()
        self.sessions = SessionRetention(self._retain_hashes)
        self._pins: Counter[int] = Counter()
        self._loads: dict[str, CopyJob] = {}
        self._in_flight: dict[int, CopyJob] = {}
        self._events = KVConnectorEvents()
        self._copier = BlockCopier(kv_cache.device)
        self._stats = Counter(dict.fromkeys(COUNTERS, 0))

    # ---- the connector interface (engine thread) ---------------------------------------

    def lookup(self, block_hashes: Sequence[BlockHash]) -> int:
        n = 0
        for block_hash in block_hashes:
            if block_hash not in self._slot_of:
                break
            n += 1
        self._stats["host_lookup_blocks"] += len(block_hashes)
        self._stats["host_hit_blocks"] += n
        return n

    def save_blocks(self, block_ids: Sequence[int], block_hashes: Sequence[BlockHash]) -> list[int]:
        pairs = []
        if not self._copier.alive:
            return []
        for block_id, block_hash in zip(block_ids, block_hashes):
            slot = self._slot_of.get(block_hash)
            if slot is not None:
                self._touch(slot)
                continue
            slot = self._take_slot()
            if slot is None:
                self._stats["offload_skipped_blocks"] += 1
                continue
            self._cache_slot(slot, block_hash)
            pairs.append((block_id, slot))
        if not pairs:
            return []
        job = CopyJob("offload", self._runs(pairs, to_host=True), device_block_ids=[b for b, _ in pairs],
                      host_slots=[s for _, s in pairs])
        self._pins.update(job.host_slots)
        self._submit(job)
        return job.device_block_ids

    def start_load(self, request_id: str, source: HostBlocks, dst_block_ids: list[int]) -> None:
        slots = [self._slot_of.get(h) for h in source.block_hashes]
        if request_id in self._loads or None in slots or len(dst_block_ids) < len(slots) or not self._copier.alive:
            self._stats["restores_failed"] += 1
            self._events.load_failed.append((request_id, "host blocks gone, copier stopped, or request already loading"))
            self._copier.on_done()  # the engine may wait for this load's event next
            return
        pairs = list(zip(dst_block_ids, slots))
        job = CopyJob("restore", self._runs(pairs, to_host=False), request_id, [b for b, _ in pairs], slots)
        for slot in slots:
            self._touch(slot)
        self._pins.update(slots)
        self._loads[request_id] = job
        self._submit(job)

    def hold(self, request_id: str, block_ids: list[int], num_tokens: int,
             block_hashes: Sequence[BlockHash] = ()) -> object:
        raise RuntimeError("the host tier holds no KV for another engine")

    def retain(self, key: str, block_hashes: Sequence[BlockHash], until_s: float) -> None:
        self.sessions.retain(key, block_hashes, until_s)

    def poll(self) -> KVConnectorEvents:
        for job in self._copier.take_done():
            self._finish(job)
        if self._in_flight and not self._copier.alive:  # its thread is gone: nothing will copy them
            for job in list(self._in_flight.values()):
                job.error = "the host copier stopped"
                self._finish(job)
        events, self._events = self._events, KVConnectorEvents()
        return events

    def set_wakeup(self, wake) -> None:
        """Every finished copy wakes the engine; a copier that died is noticed at the engine's
        next poll (its idle tick)."""
        self._copier.on_done = wake

    def abort(self, request_id: str) -> None:
        """The load ends as load_failed 'aborted' once no copy writes into its dst blocks."""
        job = self._loads.get(request_id)
        if job is not None:
            job.cancelled = True

    def stats(self) -> dict:
        stats = dict(self._stats)
        stats.update(host_blocks_total=self.num_blocks, host_blocks_used=len(self._slot_of),
                     host_bytes_total=self.num_blocks * self.block_bytes,
                     host_bytes_used=len(self._slot_of) * self.block_bytes,
                     host_blocks_pinned=len(self._pins), host_sessions=len(self.sessions))
        return stats

    def close(self) -> None:
        self._copier.close()

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    # ---- completions -------------------------------------------------------------------

    def _submit(self, job: CopyJob) -> None:
        self._in_flight[id(job)] = job
        self._copier.submit(job)

    def _finish(self, job: CopyJob) -> None:
        if self._in_flight.pop(id(job), None) is None:
            return  # already failed when the copier stopped
        self._pins.subtract(job.host_slots)
        self._pins += Counter()
        if job.kind == "offload":
            self._finish_offload(job)
        else:
            self._finish_restore(job)

    def _finish_offload(self, job: CopyJob) -> None:
        self._events.saved_block_ids += job.device_block_ids
        if job.error is not None:  # the slots hold garbage: forget them
            for slot in job.host_slots:
                self._drop_slot(slot)
            self._stats["offloads_failed"] += 1
            return
        self._stats["offload_blocks"] += len(job.host_slots)
        self._stats["offload_us_total"] += int(job.seconds * 1e6)
        self._stats["offload_runs"] += len(job.runs)

    def _finish_restore(self, job: CopyJob) -> None:
        self._loads.pop(job.request_id, None)
        if job.cancelled or job.error is not None:
            reason = "aborted" if job.cancelled else f"host restore failed: {job.error}"
            self._stats["restores_aborted" if job.cancelled else "restores_failed"] += 1
            self._events.load_failed.append((job.request_id, reason))
            return
        self._events.loaded.append(job.request_id)
        self._events.loaded_bytes[job.request_id] = job.nbytes
        self._stats["restore_blocks"] += len(job.host_slots)
        self._stats["restores"] += 1
        self._stats["restore_runs"] += len(job.runs)
        self._stats["restore_us_total"] += int(job.seconds * 1e6)
        self._stats["restore_bytes"] += job.nbytes

    # ---- slots -------------------------------------------------------------------------

    def _take_slot(self) -> int | None:
        if self._free_slots:
            return self._free_slots.pop()
        for lru in (self._lru, self._lru_retained):
            for slot in lru:
                if not self._pins[slot]:
                    self._drop_slot(slot)
                    self._stats["host_evicted_blocks"] += 1
                    return self._free_slots.pop()
        return None

    def _cache_slot(self, slot: int, block_hash: BlockHash) -> None:
        self._slot_of[block_hash] = slot
        self._hash_of_slot[slot] = block_hash
        (self._lru_retained if block_hash in self._retained else self._lru)[slot] = None

    def _drop_slot(self, slot: int) -> None:
        block_hash = self._hash_of_slot.pop(slot)
        del self._slot_of[block_hash]
        self._lru.pop(slot, None)
        self._lru_retained.pop(slot, None)
        self._free_slots.append(slot)

    def _touch(self, slot: int) -> None:
        (self._lru_retained if slot in self._lru_retained else self._lru).move_to_end(slot)

    def _retain_hashes(self, block_hashes: Sequence[BlockHash], retained: bool) -> None:
        for block_hash in block_hashes:
            before = block_hash in self._retained
            self._retained[block_hash] += 1 if retained else -1
            if self._retained[block_hash] <= 0:
                del self._retained[block_hash]
            slot = self._slot_of.get(block_hash)
            if slot is not None and before != (block_hash in self._retained):
                (self._lru if retained else self._lru_retained).pop(slot)
                (self._lru_retained if retained else self._lru)[slot] = None

    def _runs(self, pairs: list[tuple[int, int]], to_host: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(device block, host slot) pairs -> (src, dst) views, one per run adjacent on both sides."""
        runs, start = [], 0
        pairs = sorted(pairs)
        for i in range(1, len(pairs) + 1):
            if i < len(pairs) and pairs[i][0] == pairs[i - 1][0] + 1 and pairs[i][1] == pairs[i - 1][1] + 1:
                continue
            (d, s), n = pairs[start], i - start
            device, host = self._device[d : d + n], self._host[s : s + n]
            runs.append((device, host) if to_host else (host, device))
            start = i
        return runs

    def check_integrity(self) -> None:
        """Every slot is free xor cached in exactly one LRU class; pins only on cached slots."""
        cached = set(self._hash_of_slot)
        assert len(self._free_slots) + len(cached) == self.num_blocks, "host slots lost"
        assert not cached & set(self._free_slots), "a host slot is free and cached"
        assert set(self._lru) | set(self._lru_retained) == cached, "a cached host slot is in no LRU"
        assert not set(self._lru) & set(self._lru_retained), "a host slot is in both LRU classes"
        assert all(self._slot_of[h] == s for s, h in self._hash_of_slot.items()), "host hash maps differ"
        assert set(self._pins) <= cached, "a pinned host slot is not cached"
