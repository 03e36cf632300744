"""Decode side of KV transfer: pulls a request's blocks from the prefill side named in its handle.

Lifecycle of a load (one per request):

    ASKING     `load` sent to the prefill's control address; waiting for accepted/rejected
    RECEIVING  accepted; the data plane's receives are posted straight into the dst blocks
    LOADED     every run landed -> ConnectorEvents.loaded (the engine is woken), then `done`
               sent to the prefill
    FAILED     rejected, timed out, peer gone or aborted -> ConnectorEvents.load_failed,
               `failed` sent to the prefill (so it frees its blocks now, not at lease end)

Every load ends LOADED or FAILED within timeout_s (+ the data plane's cancellation grace).

Abort: while ASKING, the load's task is cancelled at once (nothing was posted into the dst
blocks). The prefill side may still accept the load we no longer want; a drain task then receives
its data into a scratch buffer, so the prefill's sends complete and its blocks are freed promptly
(UCX only; with NCCL an abort never cancels, to keep both ranks' send/recv order identical).
While RECEIVING it is *not* cancelled -- the transport owns the dst buffers until its receives
retire -- it is marked aborted and reported as failed ('aborted') when the receives end, which
is bounded by the transfer deadline. A load that already finished but was not yet polled is
moved from `loaded` to `load_failed`. So: once a request shows up in load_failed, nothing writes
into its dst blocks any more, and the engine must keep them allocated until then.

Layout: a handle whose layout hash is not ours is refused before any block moves; the refusal
asks the prefill for its `KvLayout` (`describe`) to name both sides' values. Every `load` carries
our `KvLayout`, which the prefill checks too. With tensor parallelism (`shards`), the whole-head
blocks land in a staging tensor that the engine thread scatters to the ranks at its next poll().

Groups: a pool split by KV layer group receives each of the handle's block lists into the dst
list of the same group (`dst_groups`), each group's runs landing in that group's pool; the load
message flattens both sides' lists group after group.

Trust: a handle's control address is dialled only if it is among `trusted_prefills` (when that
list is set); the gRPC plane already admits handles from authenticated callers only. The data
plane connects only to the address the prefill's authenticated `accepted` names.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from dataclasses import dataclass, field

import torch

from splitserve.shared.parallel.kv_shards import KvShards

from .block_runs import group_regions, group_runs, run_starts
from .control import ControlClient
from .data_plane import DataPlane, TransferError, remaining_s
from .events import EventQueue
from .handle import KV_HANDLE_VERSION, KvHandle, KvHandleError, KvLayout, layout_mismatch

logger = logging.getLogger(__name__)

DESCRIBE_TIMEOUT_S = 2.0
"""How long a refused load waits for the prefill's layout (only to word the refusal)."""


@dataclass
class Load:
    request_id: str
    handle: KvHandle
    dst_groups: tuple[tuple[int, ...], ...]
    """Where each of the handle's block lists lands, one list per pool (one pool: one list)."""
    deadline: float
    started: float = field(default_factory=time.monotonic)
    transfer_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    tag: int = field(default_factory=lambda: random.getrandbits(47) << 16)  # + run index
    task: asyncio.Task | None = None
    running: bool = False  # the task has begun: cancelling it now runs its cleanup
    receiving: bool = False
    aborted: bool = False
    notify_prefill: bool = True  # False once the prefill side is known not to need our outcome
    staging: torch.Tensor | None = None  # tensor parallelism: the whole-head blocks land here

    @property
    def num_blocks(self) -> int:
        return sum(map(len, self.dst_groups))


class DecodeSide:
    def __init__(self, pools: list[torch.Tensor], instance_id: str, layout: KvLayout, layout_hash: str,
                 data_plane: DataPlane, client: ControlClient, events: EventQueue, timeout_s: float,
                 trusted_prefills: tuple[str, ...] = (), shards: KvShards | None = None, stage=None):
        """`shards` / `stage(request_id, blocks, dst_block_ids)`: with tensor parallelism, loads land
        in a whole-head staging tensor from `shards`, handed to `stage` before the loaded event."""
        self._pools, self._instance_id, self._layout_hash = pools, instance_id, layout_hash
        self._layout, self._shards, self._stage = layout, shards, stage
        self._data_plane, self._client, self._events = data_plane, client, events
        self._timeout_s = timeout_s
        self._trusted = frozenset(trusted_prefills)
        self._loads: dict[str, Load] = {}
        # nccl: one transfer at a time keeps send/recv order identical on both ranks
        self._serial = asyncio.Lock() if data_plane.name == "nccl" else None
        self._closing = False

    def start(self, request_id: str, handle: KvHandle, dst_groups: list[list[int]], started: float) -> None:
        src_groups = handle.block_lists()
        if len(dst_groups) == len(src_groups):  # (else the layout check refuses it before any block moves)
            dst_groups = [d[:len(src)] for d, src in zip(dst_groups, src_groups)]
        dst = tuple(map(tuple, dst_groups))
        load = Load(request_id, handle, dst, deadline=started + self._timeout_s, started=started)
        self._loads[request_id] = load
        load.task = asyncio.ensure_future(self._run(load))

    def has(self, request_id: str) -> bool:
        return request_id in self._loads

    def abort(self, request_id: str) -> bool:
        load = self._loads.get(request_id)
        if load is None:
            return self._events.retract_loaded(request_id)
        load.aborted = True
        if load.running and not load.receiving and self._serial is None:
            load.task.cancel()
        # A task cancelled before its first step would never run its cleanup (no event, a leaked
        # entry): one that has not begun sees `aborted` when it does, and ends at once.
        return True

    async def close(self) -> None:
        tasks = [load.task for load in self._loads.values() if load.task is not None]
        self._closing = True
        for load in self._loads.values():
            load.aborted = True
            if load.running and not load.receiving and self._serial is None:
                load.task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=self._timeout_s)

    async def _run(self, load: Load) -> None:
        reason = None
        nbytes = num_runs = 0
        draining = False
        try:
            load.running = True
            if load.aborted:
                raise asyncio.CancelledError  # aborted before it began: nothing was sent yet
            if self._serial is not None:
                async with self._serial:
                    nbytes, num_runs = await self._transfer(load)
            else:
                nbytes, num_runs = await self._transfer(load)
        except asyncio.CancelledError:
            reason = "aborted"
            draining = not self._closing and self._client.inbox(load.transfer_id) is not None
            if draining:
                asyncio.ensure_future(self._drain(load))
        except TransferError as exc:
            reason = str(exc)
        except Exception as exc:  # noqa: BLE001 - every load must end in an event
            logger.exception("load of %s failed unexpectedly", load.request_id)
            reason = f"internal error: {exc!r}"
        finally:
            if not draining:
                self._client.close_inbox(load.transfer_id)  # else _drain owns the inbox
            del self._loads[load.request_id]
        if load.aborted:
            reason = "aborted"
        self._finish(load, reason, nbytes, num_runs)

    def _finish(self, load: Load, reason: str | None, nbytes: int, num_runs: int) -> None:
        """The engine is told first (its wake-up is on the hand-off's critical path), the prefill
        after (it only frees its blocks)."""
        if reason is None:
            if load.staging is not None:
                self._stage(load.request_id, load.staging, list(load.dst_groups[0]))
            seconds = time.monotonic() - load.started
            self._events.loaded(load.request_id, nbytes, num_runs, load.num_blocks, seconds)
        else:
            logger.info("load of %s failed: %s", load.request_id, reason)
            self._events.load_failed(load.request_id, reason)
        h = load.handle
        if load.notify_prefill:
            outcome = {"type": "done" if reason is None else "failed", "request_id": h.request_id,
                       "transfer_id": load.transfer_id, "prefill_instance_id": h.instance_id,
                       "reason": reason}
            self._client.send(h.control_address, outcome)

    async def _transfer(self, load: Load) -> tuple[int, int]:
        h = load.handle
        if h.version != KV_HANDLE_VERSION:
            raise TransferError(f"handle version {h.version} unsupported (expected {KV_HANDLE_VERSION})")
        if self._trusted and not _is_trusted(h.control_address, self._trusted):
            raise TransferError(f"the handle names control address {h.control_address!r}, which is not "
                                f"among the trusted prefill addresses {sorted(self._trusted)}")
        if h.layout_hash != self._layout_hash:
            raise await self._layout_refusal(load)
        if len(h.block_lists()) != len(self._pools):
            raise TransferError(f"the handle has {len(h.block_lists())} block lists, this decode engine's pool "
                                f"{len(self._pools)} KV layer groups")
        inbox = self._client.open_inbox(load.transfer_id)
        self._client.send(h.control_address, self._load_message(load))
        reply = await self._next_reply(load, inbox)
        if reply["type"] == "rejected":
            load.notify_prefill = False
            raise TransferError(f"prefill rejected the load: {reply.get('reason')}")
        if reply["type"] != "accepted":
            raise TransferError(f"unexpected control reply {reply['type']!r}")
        runs = group_runs(h.block_lists(), load.dst_groups)
        regions = self._regions(load, runs)
        stop = asyncio.Event()
        watcher = asyncio.ensure_future(self._watch_send_failed(inbox, stop))
        load.receiving = True
        try:
            await self._data_plane.recv(h.instance_id, reply["data_address"], load.tag, regions,
                                        load.deadline, stop)
        finally:
            watcher.cancel()
        return sum(r.numel() * r.element_size() for r in regions), len(runs)

    async def _drain(self, load: Load) -> None:
        """After an abort while ASKING: if the prefill side accepts anyway, take its data into
        scratch memory (the dst blocks are no longer ours) so its sends do not hang."""
        inbox = self._client.inbox(load.transfer_id)
        try:
            reply = await asyncio.wait_for(inbox.get(), remaining_s(load.deadline))
            if reply["type"] != "accepted":
                return
            runs = group_runs(load.handle.block_lists(), load.dst_groups)
            scratch = [self._shards.staging(r.run.num_blocks) if self._shards else torch.empty_like(region)
                       for r, region in zip(runs, group_regions(self._pools, runs, "dst"))]
            await self._data_plane.recv(load.handle.instance_id, reply["data_address"], load.tag,
                                        scratch, load.deadline, asyncio.Event())
        except (asyncio.TimeoutError, TransferError) as exc:
            logger.info("draining aborted load %s: %r", load.request_id, exc)
        finally:
            self._client.close_inbox(load.transfer_id)

    def _regions(self, load: Load, runs) -> list[torch.Tensor]:
        """Where each run lands: straight in the pool, or (tensor parallelism) in a whole-head
        staging tensor in dst order, scattered to the ranks when the engine polls."""
        if self._shards is None:
            return group_regions(self._pools, runs, "dst")
        load.staging = self._shards.staging(load.num_blocks)  # one pool
        block_runs = [r.run for r in runs]
        return [load.staging[start:start + r.num_blocks] for r, start in zip(block_runs, run_starts(block_runs))]

    async def _layout_refusal(self, load: Load) -> TransferError:
        """The handle's layout hash is not ours: ask the prefill for its `KvLayout` (bounded) so the
        refusal names both sides' values. Nothing is loaded either way."""
        h = load.handle
        reason = f"layout hash mismatch: handle has {h.layout_hash!r}, this decode engine has {self._layout_hash!r}"
        inbox = self._client.open_inbox(load.transfer_id)
        self._client.send(h.control_address, {"type": "describe", "transfer_id": load.transfer_id})
        try:
            reply = await asyncio.wait_for(inbox.get(), min(DESCRIBE_TIMEOUT_S, remaining_s(load.deadline)))
            detail = layout_mismatch(KvLayout.from_dict(reply["layout"]), self._layout) if "layout" in reply else None
        except (asyncio.TimeoutError, KvHandleError):
            detail = None
        return TransferError(f"{reason}: {detail}" if detail else f"{reason} (model, dtype, block size or shape differ)")

    async def _next_reply(self, load: Load, inbox: asyncio.Queue) -> dict:
        try:
            return await asyncio.wait_for(inbox.get(), remaining_s(load.deadline))
        except asyncio.TimeoutError:
            self._client.drop(load.handle.control_address)  # the peer may have vanished
            load.notify_prefill = False
            raise TransferError(f"prefill at {load.handle.control_address} did not answer within "
                                f"{self._timeout_s:.1f} s") from None

    async def _watch_send_failed(self, inbox: asyncio.Queue, stop: asyncio.Event) -> None:
        while True:
            msg = await inbox.get()
            if msg["type"] == "send_failed":
                logger.warning("prefill reports its send failed: %s", msg.get("reason"))
                stop.set()
                return

    def _load_message(self, load: Load) -> dict:
        h = load.handle
        return {"type": "load", "transfer_id": load.transfer_id, "request_id": h.request_id,
                "prefill_instance_id": h.instance_id, "decode_instance_id": self._instance_id,
                "layout_hash": self._layout_hash, "src_block_ids": [b for ids in h.block_lists() for b in ids],
                "dst_block_ids": [b for ids in load.dst_groups for b in ids], "tag": load.tag,
                "data_address": self._data_plane.address(), "layout": self._layout.to_dict()}


def _is_trusted(control_address: str, trusted: frozenset[str]) -> bool:
    """`tcp://host:port` matches a trusted `host:port`, or a bare `host` (any port)."""
    host_port = control_address.removeprefix("tcp://")
    return host_port in trusted or host_port.rpartition(":")[0] in trusted
