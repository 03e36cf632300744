"""`TransferConnector`: the P/D implementation of `KVConnector` (shared/kv/connector.py), which
moves KV blocks between a prefill and a decode engine.

One per engine. The engine thread calls hold / start_load / poll / abort / stats; none of them
blocks on I/O (abort waits, bounded, until the connector's loop has applied it). All I/O runs on the connector's own thread, which owns one asyncio loop carrying
the ZMQ control sockets and the data plane (ucxx is asyncio-based; the NCCL backend adds one
thread for blocking torch.distributed calls).

Engine contract:
- call poll() at the start of every step: free the blocks of `released` requests (prefill),
  admit `loaded` requests at that very step, free the dst blocks of `load_failed` requests and
  recompute them (decode). Each event is reported exactly once. An engine with nothing to step
  but KV in flight sleeps until the wake-up it gave `set_wakeup` is called (every event calls it).
- on a request abort, call abort(request_id). Decode side: keep the dst blocks allocated until
  the request appears in load_failed (reason 'aborted'); from then on nothing writes into them.
  Prefill side: the hold shows up in `released` (after any send still reading it has ended).
- on CUDA, hold() must be called after the prefill step's kernels finished writing the blocks
  (the engine has synchronized to read the sampled token anyway).

Block lists: with one pool, hold() and start_load() take a flat list of block ids. With a pool
split by KV layer group (one tensor per group, `kv_cache` a list of them) they take one list per
group, in group order, each ending at the prompt's last block: a sliding group's holds only the
blocks its window can still see there (shared/kv/layer_groups.py says which), so fewer bytes move.
The handle then carries the lists in `KvHandle.groups`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid

import torch
import zmq.asyncio

from .config import TransferConfig
from splitserve.shared.auth import control_key
from splitserve.shared.parallel.kv_shards import KvShards

from .control import ControlClient, ControlServer
from .decode_side import DecodeSide
from .events import ConnectorEvents, EventQueue
from .handle import KvHandle, KvLayout
from .prefill_side import PrefillSide

logger = logging.getLogger(__name__)
_ABORT_WAIT_S = 5.0

__all__ = ["TransferConnector", "ConnectorEvents", "TransferConfig"]

STARTUP_TIMEOUT_S = 30.0


class TransferConnector:
    def __init__(self, kv_cache: torch.Tensor | list[torch.Tensor], config: TransferConfig,
                 secret: bytes | None = None, layout: KvLayout | None = None, shards: KvShards | None = None):
        """`kv_cache`: the pool, or one pool per KV layer group (then `layout` names the groups).
        `secret`: the stack's shared secret (shared/auth.py); control messages are signed with
        a key derived from it and messages not signed with it are dropped. `layout`: what this
        engine's pool holds (default: one rank, read off kv_cache). `shards`: with tensor
        parallelism, rank 0's access to its ranks' head shards (kv_cache is then rank 0's shard):
        blocks cross the wire with whole heads, gathered at hold() and scattered at poll()."""
        config.validate()
        pools = list(kv_cache) if isinstance(kv_cache, (list, tuple)) else [kv_cache]
        for pool in pools:
            if pool.dim() != 6 or not pool.is_contiguous():
                raise ValueError(f"kv_cache must be a contiguous [num_blocks, num_layers, 2, block_size, "
                                 f"Hkv, D] tensor, got shape {tuple(pool.shape)}")
        self.config = config
        self.instance_id = str(uuid.uuid4())
        self.block_size = pools[0].shape[3]
        self.layout = layout or _one_rank_layout(pools[0], config.model_id)
        if len(pools) != max(1, len(self.layout.kv_groups)):
            raise ValueError(f"{len(pools)} KV pools but the layout names {len(self.layout.kv_groups)} layer groups")
        if (self.layout.tensor_parallel_size > 1) != (shards is not None and shards.world_size > 1):
            raise ValueError(f"layout says {self.layout.tensor_parallel_size} tensor-parallel ranks, but "
                             f"{'no' if shards is None else shards.world_size} shards were given")
        if len(pools) > 1 and shards is not None:
            raise ValueError("a pool split by KV layer group has no tensor-parallel shards")
        self.layout_hash = config.layout_hash or self.layout.wire_hash()
        self._shards = shards if self.layout.tensor_parallel_size > 1 else None
        self._staged: dict[str, tuple[torch.Tensor, list[int]]] = {}
        self._staged_lock = threading.Lock()
        self._pools = pools
        self._kv_cache = pools[0]
        self._control_key = control_key(secret)
        self._events = EventQueue()
        self._prefill: PrefillSide | None = None
        self._decode: DecodeSide | None = None
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name=f"kv-connector-{self.instance_id[:8]}")
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(STARTUP_TIMEOUT_S)
        except BaseException:
            self.close()
            raise

    # ---- loop-side setup -------------------------------------------------------------------

    def _make_data_plane(self):
        cfg = self.config
        if cfg.backend == "nccl":
            from .nccl_backend import NcclDataPlane
            return NcclDataPlane(cfg.nccl_init_method, cfg.nccl_rank, cfg.nccl_world_size,
                                 self._kv_cache, cfg.timeout_s)
        from .ucx_backend import UcxDataPlane
        return UcxDataPlane(self.instance_id, cfg.host, cfg.ucx_tls, kv_cache=self._kv_cache)

    async def _start(self) -> None:
        cfg = self.config
        self._zctx = zmq.asyncio.Context()
        self._data_plane = self._make_data_plane()
        await self._data_plane.start()
        self._tasks: list[asyncio.Task] = []
        self._server = self._client = None
        if cfg.role in ("prefill", "both"):
            self._server = ControlServer(self._zctx, cfg.host, cfg.control_port, self._control_key)
            self._prefill = PrefillSide(self._pools, self.instance_id, self.layout,
                                        self.layout_hash, self._data_plane, self._server, self._events,
                                        cfg.timeout_s, cfg.lease_s)
            tick_s = min(0.5, cfg.lease_s / 4)
            self._tasks += [asyncio.ensure_future(self._prefill.serve()),
                            asyncio.ensure_future(self._prefill.expire_leases(tick_s))]
            logger.info("KV connector %s: prefill control at %s (bound %s)", self.instance_id,
                        self._server.address, self._server.bound)
        if cfg.role in ("decode", "both"):
            self._client = ControlClient(self._zctx, self._control_key)
            self._decode = DecodeSide(self._pools, self.instance_id, self.layout, self.layout_hash,
                                      self._data_plane, self._client, self._events, cfg.timeout_s,
                                      cfg.trusted_prefills, self._shards, self._stage)
        logger.info("KV connector %s: role %s, backend %s, layout %s (%s)", self.instance_id, cfg.role,
                    cfg.backend, self.layout_hash, self.layout)

    # ---- engine thread ---------------------------------------------------------------------

    @property
    def control_address(self) -> str:
        if self._server is None:
            raise RuntimeError("control_address exists on the prefill side only")
        return self._server.address

    def hold(self, request_id: str, block_ids: list[int] | list[list[int]], num_tokens: int,
             block_hashes=()) -> KvHandle:
        """Prefill side: keeps `block_ids` (one list per group of a split pool) for a decode side
        to load; starts the lease. `block_hashes` (the prompt's full blocks' chained hashes, if
        known) travel in the handle."""
        if self._prefill is None:
            raise RuntimeError(f"hold() needs role 'prefill' or 'both', this connector is {self.config.role!r}")
        groups = self._checked_groups(block_ids, f"hold({request_id!r})")
        lengths = [len(ids) for ids in groups]
        if len(groups) > 1:  # every list ends at the prompt's last block (a sliding one starts later)
            fits = num_tokens > 0 and max(lengths) <= -(-num_tokens // self.block_size)
        else:
            fits = 0 < num_tokens <= lengths[0] * self.block_size
        if not fits:
            raise ValueError(f"hold({request_id!r}): {num_tokens} tokens do not fit block lists of "
                             f"{lengths} blocks of {self.block_size}")
        staging = self._shards.gather(groups[0]) if self._shards else None
        return self._prefill.hold(request_id, groups, num_tokens, staging, tuple(block_hashes))

    def start_load(self, request_id: str, handle: KvHandle, dst_block_ids: list[int] | list[list[int]]) -> None:
        """Decode side: starts pulling the handle's blocks into `dst_block_ids` (one list per group
        of a split pool); non-blocking. A handle of another layout (groups included) is refused
        on the connector's loop, naming both sides' layouts, not here."""
        if self._decode is None:
            raise RuntimeError(f"start_load() needs role 'decode' or 'both', this connector is {self.config.role!r}")
        dst_groups = self._checked_groups(dst_block_ids, f"start_load({request_id!r})")
        src_groups = handle.block_lists()
        if handle.layout_hash == self.layout_hash and len(src_groups) == len(dst_groups):
            self._check_load_fits(request_id, handle, src_groups, dst_groups)
        self._call(self._start_load, request_id, handle, dst_groups, time.monotonic())

    def _checked_groups(self, block_ids, what: str) -> list[list[int]]:
        """One block list per pool, each checked against its pool (one pool: the flat list)."""
        from .block_runs import check_block_ids
        groups = [list(ids) for ids in block_ids] if len(self._pools) > 1 else [list(block_ids)]
        if len(groups) != len(self._pools):
            raise ValueError(f"{what}: {len(groups)} block lists for {len(self._pools)} KV layer groups")
        for g, (ids, pool) in enumerate(zip(groups, self._pools)):
            check_block_ids(ids, pool.shape[0], what if len(groups) == 1 else f"{what} group {g}")
        return groups

    def _check_load_fits(self, request_id: str, handle: KvHandle, src_groups, dst_groups) -> None:
        # One pool: the dst table may run past the prompt. A split pool's sliding lists end at the
        # prompt's last block on both sides, so they must be equally long to line up.
        split = len(src_groups) > 1
        for g, (src, dst) in enumerate(zip(src_groups, dst_groups)):
            if len(dst) < len(src) or (split and len(dst) != len(src)):
                raise ValueError(f"start_load({request_id!r}): {len(dst)} dst blocks cannot take the "
                                 f"{len(src)} src blocks of group {g}")
        if not split and handle.num_tokens > len(src_groups[0]) * self.block_size:
            raise ValueError(f"start_load({request_id!r}): handle claims {handle.num_tokens} tokens in "
                             f"{len(src_groups[0])} blocks of {self.block_size}")

    def poll(self) -> ConnectorEvents:
        """The events since the last poll. With tensor parallelism, each loaded request's whole-head
        blocks are first scattered to the ranks' pools (the request runs this very step)."""
        events = self._events.take()
        ended = [*events.loaded, *(request_id for request_id, _ in events.load_failed)]
        with self._staged_lock:
            staged = {rid: self._staged.pop(rid) for rid in ended if rid in self._staged}
        for request_id in events.loaded:
            if request_id in staged:
                self._shards.scatter(*staged[request_id])
        return events

    def _stage(self, request_id: str, blocks: torch.Tensor, dst_block_ids: list[int]) -> None:
        """Decode side, loop thread: a load landed in staging; poll() scatters it (before it
        reports the request loaded, so the staging is registered first)."""
        with self._staged_lock:
            self._staged[request_id] = (blocks, dst_block_ids)

    def set_wakeup(self, wake) -> None:
        """`wake()` is called (on the connector's thread) whenever poll() has something new, so
        an engine waiting only on this connector can sleep until then."""
        self._events.set_wakeup(wake)

    # The host tier's side of the interface: a transfer connector keeps no blocks of its own.
    def lookup(self, block_hashes) -> int:
        return 0

    def save_blocks(self, block_ids, block_hashes) -> list[int]:
        return []

    def retain(self, key: str, block_hashes, until_s: float) -> None:
        return None

    def abort(self, request_id: str) -> None:
        """Cancels a pending load (decode) or a hold (prefill); see the module docstring.

        Returns once the abort has run on the connector's loop (bounded wait), so the next poll()
        already reflects it: a load that finished but was not polled yet comes out of that poll as
        load_failed 'aborted'. Scheduled without waiting, a poll could overtake the abort and
        report the load as loaded instead."""
        if self._closed:
            raise RuntimeError("KV connector is closed")
        if threading.get_ident() == self._thread.ident:
            self._abort(request_id)
            return
        done = threading.Event()

        def run() -> None:
            try:
                self._abort(request_id)
            finally:
                done.set()

        self._loop.call_soon_threadsafe(run)
        if not done.wait(_ABORT_WAIT_S):
            logger.warning("KV connector: abort of %s not applied within %.0f s; it stays queued",
                           request_id, _ABORT_WAIT_S)

    def stats(self) -> dict:
        stats = self._events.stats()
        stats["held"] = self._prefill.num_held() if self._prefill else 0
        stats["control_dropped"] = sum(side.dropped for side in (self._server, self._client) if side)
        return stats

    def failure(self) -> str | None:
        """Why this connector can no longer serve (its loop thread or a control task ended), or
        None. A worker reports itself unhealthy while this is set."""
        if self._closed:
            return "the KV connector is closed"
        if not self._thread.is_alive():
            return "the KV connector's loop thread died"
        for task in self._tasks:
            if task.done():
                error = None if task.cancelled() else task.exception()
                return f"a KV connector control task ended: {error!r}"
        return None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(
                    self.config.timeout_s + 10)
            except Exception as exc:  # noqa: BLE001
                logger.warning("KV connector shutdown: %r", exc)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()

    # ---- loop thread -----------------------------------------------------------------------

    def _call(self, fn, *args) -> None:
        if self._closed:
            raise RuntimeError("KV connector is closed")
        self._loop.call_soon_threadsafe(fn, *args)

    def _start_load(self, request_id: str, handle: KvHandle, dst_groups: list[list[int]], started: float) -> None:
        if self._decode.has(request_id):
            self._events.load_failed(request_id, "duplicate start_load for a request already loading")
            return
        self._decode.start(request_id, handle, dst_groups, started)

    def _abort(self, request_id: str) -> None:
        if self._decode is not None and self._decode.abort(request_id):
            return
        if self._prefill is not None:
            self._prefill.abort(request_id)

    async def _shutdown(self) -> None:
        if self._decode is not None:
            await self._decode.close()
        for task in getattr(self, "_tasks", []):
            task.cancel()
        if getattr(self, "_client", None) is not None:
            self._client.close()
        if getattr(self, "_server", None) is not None:
            self._server.close()
        if getattr(self, "_data_plane", None) is not None:
            await self._data_plane.close()
        if getattr(self, "_zctx", None) is not None:
            self._zctx.term()


def _one_rank_layout(kv_cache: torch.Tensor, model_id: str) -> KvLayout:
    _, num_layers, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    return KvLayout(model_id, str(kv_cache.dtype).removeprefix("torch."), block_size, num_layers, num_kv_heads,
                    head_dim, tensor_parallel_size=1, kv_heads_per_rank=num_kv_heads)
