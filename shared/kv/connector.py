"""`KVConnector`: the one interface through which the engine reaches KV that lives outside its pool.

Implementations: the P/D transfer (`shared/transfer/connector.py`: KV held for, or loaded from,
another engine) and the host-memory tier (`shared/host_tier/`: blocks copied to CPU RAM and back).
`CompositeConnector` puts them behind one object. The engine calls, on its own thread only:

    lookup(block_hashes)        before scheduling a waiting request: how many of these leading
                                blocks (after its device hits) can be loaded instead of computed
    start_load(rid, src, dst)   after the scheduler allocated `dst` blocks, fill them from `src`
                                (a remote `KvHandle`, or `HostBlocks`); non-blocking
    save_blocks(ids, hashes)    newly computed full blocks: copy them out if wanted; returns the ids
                                being read, which the engine pins until poll() reports them saved
    hold(rid, ids, n)           a finished prefill whose blocks another engine will read (P/D)
    retain(key, hashes, until)  a keyed session's latest blocks: keep them before anonymous ones
    poll()                      at the top of every step: loaded / load_failed / released / saved
    abort(rid)                  a request ended early: its load or hold is cancelled
    set_wakeup(wake)            once, at start: `wake()` is called (any thread) after each event
                                is queued, so an engine with nothing to step but KV in flight
                                sleeps until then instead of polling on a timer
    stats(), close()

No call blocks on I/O. Each event is reported exactly once. A load that fails leaves its dst blocks
allocated and reported in `load_failed`; the engine then recomputes those tokens.

This module imports no torch: the interface is plain data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from splitserve.shared.kv.block_hash import BlockHash


@dataclass(frozen=True)
class HostBlocks:
    """A load source: blocks the host tier holds, by chained hash, in prompt order."""

    block_hashes: tuple[BlockHash, ...]


@dataclass
class KVConnectorEvents:
    loaded: list[str] = field(default_factory=list)
    """Requests whose KV landed completely in their dst blocks."""
    load_failed: list[tuple[str, str]] = field(default_factory=list)
    """(request_id, reason). Nothing writes into the dst blocks any more: recompute (or free) them."""
    released: list[str] = field(default_factory=list)
    """Held requests whose blocks may now be freed."""
    loaded_bytes: dict[str, int] = field(default_factory=dict)
    """Bytes moved for each request in `loaded` (metrics / trace attribute)."""
    sent_bytes: dict[str, int] = field(default_factory=dict)
    """Bytes sent for each request in `released` (0: its KV never left)."""
    saved_block_ids: list[int] = field(default_factory=list)
    """Device blocks passed to save_blocks() whose copy has ended: unpin them."""

    def __bool__(self) -> bool:
        return bool(self.loaded or self.load_failed or self.released or self.saved_block_ids)

    def extend(self, other: KVConnectorEvents) -> None:
        self.loaded += other.loaded
        self.load_failed += other.load_failed
        self.released += other.released
        self.loaded_bytes.update(other.loaded_bytes)
        self.sent_bytes.update(other.sent_bytes)
        self.saved_block_ids += getattr(other, "saved_block_ids", [])


@runtime_checkable
class KVConnector(Protocol):
    def lookup(self, block_hashes: Sequence[BlockHash]) -> int: ...

    def start_load(self, request_id: str, source: object, dst_block_ids: list[int]) -> None: ...

    def save_blocks(self, block_ids: Sequence[int], block_hashes: Sequence[BlockHash]) -> list[int]: ...

    def hold(self, request_id: str, block_ids: list[int], num_tokens: int,
             block_hashes: Sequence[BlockHash] = ()) -> object: ...

    def retain(self, key: str, block_hashes: Sequence[BlockHash], until_s: float) -> None: ...

    def poll(self) -> KVConnectorEvents: ...

    def abort(self, request_id: str) -> None: ...

    def set_wakeup(self, wake) -> None: ...

    def stats(self) -> dict: ...

    def close(self) -> None: ...


class CompositeConnector:
    """The host tier and the P/D transfer behind one connector: loads with a handle go to the
    transfer, host-tier loads to the tier; saves and retention to the tier, holds to the transfer."""

    def __init__(self, tier: KVConnector | None, transfer: KVConnector | None) -> None:
        self.tier, self.transfer = tier, transfer
        self._parts = [p for p in (tier, transfer) if p is not None]
        self._tier_loads: set[str] = set()

    @property
    def instance_id(self) -> str | None:
        return getattr(self.transfer, "instance_id", None)

    def lookup(self, block_hashes: Sequence[BlockHash]) -> int:
        return self.tier.lookup(block_hashes) if self.tier is not None else 0

    def start_load(self, request_id: str, source: object, dst_block_ids: list[int]) -> None:
        if isinstance(source, HostBlocks):
            self._tier_loads.add(request_id)
        self._part_for(source).start_load(request_id, source, dst_block_ids)

    def save_blocks(self, block_ids: Sequence[int], block_hashes: Sequence[BlockHash]) -> list[int]:
        return self.tier.save_blocks(block_ids, block_hashes) if self.tier is not None else []

    def hold(self, request_id: str, block_ids: list[int], num_tokens: int,
             block_hashes: Sequence[BlockHash] = ()) -> object:
        if self.transfer is None:
            raise RuntimeError("holding KV for another engine needs the transfer connector")
        return self.transfer.hold(request_id, block_ids, num_tokens, block_hashes)

    def retain(self, key: str, block_hashes: Sequence[BlockHash], until_s: float) -> None:
        if self.tier is not None:
            self.tier.retain(key, block_hashes, until_s)

    def poll(self) -> KVConnectorEvents:
        events = KVConnectorEvents()
        for part in self._parts:
            events.extend(part.poll())
        for request_id in [*events.loaded, *(r for r, _ in events.load_failed)]:
            self._tier_loads.discard(request_id)
        return events

    def abort(self, request_id: str) -> None:
        part = self.tier if request_id in self._tier_loads else self.transfer
        if part is not None:
            part.abort(request_id)

    def set_wakeup(self, wake) -> None:
        for part in self._parts:
            part.set_wakeup(wake)

    def failure(self) -> str | None:
        """Why the transfer can no longer serve, or None (the worker's Health). A host tier whose
        copier stopped is not a failure of the worker: its restores are recomputed and counted."""
        return self.transfer.failure() if self.transfer is not None else None

    def stats(self) -> dict:
        stats: dict = {}
        for part in self._parts:
            stats.update(part.stats())
        return stats

    def close(self) -> None:
        for part in self._parts:
            part.close()

    def _part_for(self, source: object) -> KVConnector:
        part = self.tier if isinstance(source, HostBlocks) else self.transfer
        if part is None:
            kind = "host-tier blocks" if isinstance(source, HostBlocks) else "a remote KV handle"
            raise RuntimeError(f"this engine has no connector that can load {kind}")
        return part
