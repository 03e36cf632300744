"""Prefill side of KV transfer: holds finished prompts' blocks and sends them when asked.

Lifecycle of a hold (one per request):

    HELD      hold() registered the blocks; lease = now + lease_s
    SENDING   a decode side's `load` was accepted; lease extended by timeout_s + lease_s;
              the data plane reads the src blocks
    SENT      every run was sent (or the send failed and the decode side was told so)
    RELEASED  reported in ConnectorEvents.released; the engine frees the blocks

A pool split by KV layer group holds one block list per group; a load names them all in one flat
list (group after group) and each group's runs are read from that group's pool.

With tensor parallelism the hold keeps whole-head copies of its blocks (gathered from the ranks at
hold time, see shared/parallel/kv_shards.py) and sends from them; the copies go with the hold.

Release happens on the decode side's `done` or `failed`, on abort(), on a load whose layout
(`KvLayout`, sent with the load; or its hash) does not match ours (that decode side will recompute; nobody else will come for these blocks),
and when the lease runs out. A release that arrives while SENDING waits for the send to end, so
blocks are never freed under a transport still reading them. A `load` naming another instance id
(we restarted since the handle was made) is rejected and touches no hold of ours.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass

import torch

from .block_runs import group_regions, group_runs, run_starts
from .control import ControlServer
from .data_plane import DataPlane, TransferError
from .events import EventQueue
from .handle import KV_HANDLE_VERSION, KvHandle, KvLayout, layout_mismatch

logger = logging.getLogger(__name__)


@dataclass
class Hold:
    request_id: str
    groups: tuple[tuple[int, ...], ...]
    """The held blocks, one list per pool (one pool: one list)."""
    num_tokens: int
    expires_at: float
    transfer_id: str | None = None
    sending: bool = False
    release_reason: str | None = None  # set while sending: release once the send ends
    bytes_sent: int = 0
    staging: torch.Tensor | None = None
    """Tensor parallelism: whole-head copies of the blocks (gathered from the ranks at hold time);
    the send reads these instead of the pool."""

    @property
    def block_ids(self) -> tuple[int, ...]:
        """Every group's blocks, group after group: what a load's src_block_ids must be."""
        return tuple(b for ids in self.groups for b in ids)

    def split(self, flat: list[int]) -> list[list[int]]:
        """A flat dst list cut into this hold's group lengths."""
        out, start = [], 0
        for ids in self.groups:
            out.append(list(flat[start:start + len(ids)]))
            start += len(ids)
        return out


class PrefillSide:
    def __init__(self, pools: list[torch.Tensor], instance_id: str, layout: KvLayout, layout_hash: str,
                 data_plane: DataPlane, server: ControlServer, events: EventQueue,
                 timeout_s: float, lease_s: float):
        self._pools, self._instance_id, self._layout_hash = pools, instance_id, layout_hash
        self._layout = layout
        self._data_plane, self._server, self._events = data_plane, server, events
        self._timeout_s, self._lease_s = timeout_s, lease_s
        self._lock = threading.Lock()  # hold() runs on the engine thread, the rest on the loop
        self._holds: dict[str, Hold] = {}

    # ---- engine thread ---------------------------------------------------------------------

    def hold(self, request_id: str, groups: list[list[int]], num_tokens: int,
             staging: torch.Tensor | None = None, block_hashes: tuple[bytes, ...] = ()) -> KvHandle:
        groups = tuple(tuple(ids) for ids in groups)
        with self._lock:
            if request_id in self._holds:
                raise ValueError(f"request {request_id!r} is already held")
            self._holds[request_id] = Hold(request_id, groups, num_tokens,
                                           time.monotonic() + self._lease_s, staging=staging)
        split = len(groups) > 1
        return KvHandle(KV_HANDLE_VERSION, self._instance_id, request_id, () if split else groups[0],
                        num_tokens, self._layout_hash, self._server.address, groups=groups if split else (),
                        block_hashes=block_hashes)

    def num_held(self) -> int:
        with self._lock:
            return len(self._holds)

    # ---- loop thread -----------------------------------------------------------------------

    def abort(self, request_id: str) -> bool:
        with self._lock:
            hold = self._holds.get(request_id)
        if hold is not None:
            self._release(hold, "aborted")
        return hold is not None

    async def serve(self) -> None:
        """Forever: one control message after another. A message that fails its checks, or
        that the handlers cannot take, is dropped and counted: it never ends this task."""
        while True:
            peer, msg = await self._server.recv()
            if msg is None:
                continue
            try:
                self._handle(peer, msg)
            except Exception:  # noqa: BLE001 - one bad message must not stop the control plane
                self._server.dropped += 1
                logger.exception("dropping a control message its handler failed on: %.200r", msg)

    def _handle(self, peer: bytes, msg: dict) -> None:
        if msg["type"] == "load":
            self._on_load(peer, msg)
        elif msg["type"] == "describe":  # a decode side that cannot use our handles asks why
            self._server.reply(peer, {"type": "layout", "transfer_id": msg["transfer_id"],
                                      "layout": self._layout.to_dict()})
        elif msg["type"] in ("done", "failed"):
            self._on_outcome(msg)
        else:
            self._server.dropped += 1
            logger.warning("control message of type %r is not for a prefill side", msg["type"])

    async def expire_leases(self, tick_s: float) -> None:
        while True:
            await asyncio.sleep(tick_s)
            now = time.monotonic()
            with self._lock:
                expired = [h for h in self._holds.values() if h.expires_at <= now and not h.sending]
            for hold in expired:
                logger.info("lease of %s expired (no decode side confirmed)", hold.request_id)
                self._release(hold, "lease expired")

    def _release(self, hold: Hold, reason: str) -> None:
        if hold.sending:
            hold.release_reason = hold.release_reason or reason
            return
        with self._lock:
            if self._holds.pop(hold.request_id, None) is None:
                return
        hold.staging = None
        logger.debug("released %s (%s)", hold.request_id, reason)
        self._events.released(hold.request_id, hold.bytes_sent)

    def _reject_reason(self, msg: dict, hold: Hold | None) -> str | None:
        if msg.get("prefill_instance_id") != self._instance_id:
            return (f"unknown prefill instance_id {msg.get('prefill_instance_id')!r}: this prefill "
                    f"is {self._instance_id} (the handle is from a previous process?)")
        if msg.get("layout") is not None:
            mismatch = layout_mismatch(self._layout, KvLayout.from_dict(msg["layout"]))
            if mismatch:
                return mismatch
        if msg.get("layout_hash") != self._layout_hash:
            return (f"layout hash mismatch: decode sent {msg.get('layout_hash')!r}, this prefill has "
                    f"{self._layout_hash!r} (model, dtype, block size or shape differ)")
        if msg["data_address"].get("backend") != self._data_plane.name:
            return (f"backend mismatch: decode uses {msg['data_address'].get('backend')!r}, "
                    f"this prefill uses {self._data_plane.name!r}")
        if hold is None:
            return f"request {msg.get('request_id')!r} is not held here (released, expired or never held)"
        if hold.transfer_id is not None:
            return f"request {hold.request_id!r} is already being loaded (transfer {hold.transfer_id})"
        if tuple(msg.get("src_block_ids", ())) != hold.block_ids:
            return f"src block ids {msg.get('src_block_ids')} differ from the held {list(hold.block_ids)}"
        if len(msg.get("dst_block_ids", ())) != len(hold.block_ids):
            return f"{len(msg.get('dst_block_ids', ()))} dst blocks for {len(hold.block_ids)} src blocks"
        return None

    def _on_load(self, peer: bytes, msg: dict) -> None:
        with self._lock:
            hold = self._holds.get(msg.get("request_id"))
        reason = self._reject_reason(msg, hold)
        if reason is not None:
            logger.warning("rejecting load of %s: %s", msg.get("request_id"), reason)
            self._server.reply(peer, {"type": "rejected", "transfer_id": msg.get("transfer_id"),
                                      "reason": reason})
            if hold is not None and reason.startswith(("layout hash mismatch", "KV layout mismatch")):
                self._release(hold, "layout hash mismatch")
            return
        hold.transfer_id, hold.sending = msg["transfer_id"], True
        hold.expires_at = time.monotonic() + self._timeout_s + self._lease_s
        runs = group_runs(hold.groups, hold.split(msg["dst_block_ids"]))
        self._server.reply(peer, {"type": "accepted", "transfer_id": hold.transfer_id,
                                  "num_runs": len(runs), "data_address": self._data_plane.address()})
        asyncio.ensure_future(self._send(peer, hold, msg, runs))

    async def _send(self, peer: bytes, hold: Hold, msg: dict, runs) -> None:
        if hold.staging is None:
            regions = group_regions(self._pools, runs, "src")
        else:  # one pool; the staging holds the blocks in hold order
            block_runs = [r.run for r in runs]
            regions = [hold.staging[start:start + r.num_blocks] for r, start in zip(block_runs, run_starts(block_runs))]
        nbytes = sum(r.numel() * r.element_size() for r in regions)
        try:
            await self._data_plane.send(msg["decode_instance_id"], msg["data_address"], msg["tag"],
                                        regions, time.monotonic() + self._timeout_s)
            hold.bytes_sent = nbytes
            self._events.sent(nbytes, len(runs), len(hold.block_ids), ok=True)
        except TransferError as exc:
            logger.warning("sending %s failed: %s", hold.request_id, exc)
            self._events.sent(0, 0, 0, ok=False)
            self._server.reply(peer, {"type": "send_failed", "transfer_id": hold.transfer_id,
                                      "reason": str(exc)})
        finally:
            hold.sending = False
            if hold.release_reason is not None:
                self._release(hold, hold.release_reason)

    def _on_outcome(self, msg: dict) -> None:
        if msg.get("prefill_instance_id") != self._instance_id:
            return  # about a previous incarnation of this prefill: nothing of ours
        with self._lock:
            hold = self._holds.get(msg.get("request_id"))
        if hold is None:
            return
        if hold.transfer_id is not None and msg.get("transfer_id") != hold.transfer_id:
            return  # stale message about another load of the same request id
        reason = "decode done" if msg["type"] == "done" else f"decode failed: {msg.get('reason')}"
        self._release(hold, reason)
