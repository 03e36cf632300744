"""UCX data plane over ucxx: endpoints made from worker addresses the control plane exchanged.

Connections: no UCX listener. ucxx's listener binds every interface whatever host it is given,
and anyone could connect to it and say hello as any prefill. Instead each side puts its UCX
worker address in its authenticated control messages (decode -> prefill in `load`, prefill ->
decode in `accepted`), and endpoints are made from those addresses only. The prefill side keeps
one sending endpoint per decode instance, the decode side one receiving endpoint per prefill
instance (receives are posted on it, so closing it cancels them); both are created on first use
and dropped on any failure, so a restarted or vanished peer is reconnected, never reused.

Binding: the only sockets UCX opens are its transports' own (the tcp transport listens on each
network device it uses). `UCX_NET_DEVICES` is set to the device that carries the configured
host's address, so they listen on that address only; a wildcard host (0.0.0.0) keeps every
device, and a UCX_NET_DEVICES set by the operator (RDMA devices across nodes) is left alone.

Messages: one tagged message per coalesced block run, tag = transfer tag + run index (the
transfer tag is random and 48-bit-shifted, so tags never collide across transfers). The decode
side posts its receives straight into the dst regions of its kv_cache: no staging copy. Messages
above UCX_RNDV_THRESH (ucxx sets 8 KiB) use rendezvous, i.e. the payload lands directly in the
posted buffer; smaller ones are eager and UCX copies them once from its own buffer.

Cancellation: ucxx has no per-request cancel, but closing an endpoint cancels every receive
posted on it. A failed or timed-out transfer therefore closes the peer's endpoint (which also
drops the connection to a peer that stalled) and waits for its receives to retire; if any still
runs after GRACE_S, every in-flight request of the worker is cancelled. Only then does `recv`
raise, so a failed load can no longer write into its dst blocks.

Transports: CPU test machines use UCX_TLS=tcp. On GPU nodes the same code moves CUDA tensors
(as_bytes hands UCX the __cuda_array_interface__) with UCX_TLS=cuda_copy,cuda_ipc,rc,tcp:
cuda_ipc over NVLink within a node, rc (InfiniBand/RoCE, GPUDirect RDMA) across nodes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import torch

from splitserve.shared.listening import listening_sockets, net_device_of

from .data_plane import GRACE_S, TransferError, as_bytes, remaining_s, retire, wait_all

# Importing ucxx sets UCX variables (e.g. UCX_RNDV_FRAG_MEM_TYPE) that UCX 1.21 warns about at
# every context creation when no CUDA transport is loaded; silence that before the import.
os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
import ucxx  # noqa: E402

logger = logging.getLogger(__name__)

_owner: object | None = None  # ucxx has one context per process: one UCX data plane at a time


class UcxDataPlane:
    name = "ucx"

    def __init__(self, instance_id: str, host: str, tls: str | None, kv_cache: torch.Tensor):
        self._instance_id = instance_id
        self._host, self._tls = host, tls
        self._is_cuda = kv_cache.is_cuda
        self._worker_address = ""
        self._receiving: dict[str, object] = {}       # decode side: prefill instance id -> endpoint
        self._sending: dict[str, object] = {}         # prefill side: decode instance id -> endpoint
        self._connect_locks: dict[str, asyncio.Lock] = {}

    async def start(self) -> None:
        global _owner
        if _owner is not None:
            raise RuntimeError("a UCX KV connector is already running in this process "
                               "(ucxx keeps one context per process); use role='both'")
        _owner = self
        before = listening_sockets()
        # Created on this (the connector's) loop: ucxx binds its notifier thread to it.
        # Python futures + notifier thread: waiting requests cost no CPU (wait_yield polls).
        ucxx.init(options=self._ucx_options(), enable_python_future=True)
        self._worker_address = bytes(ucxx.get_worker_address()).hex()
        self._log_transports()
        logger.info("UCX transports listen on %s", sorted(listening_sockets() - before) or "nothing")

    def _ucx_options(self) -> dict:
        options = {"TLS": self._tls} if self._tls else {}
        if "UCX_NET_DEVICES" not in os.environ:
            device = net_device_of(self._host)
            if device is not None:
                options["NET_DEVICES"] = device
        return options

    def address(self) -> dict:
        return {"backend": self.name, "worker_address": self._worker_address}

    def _log_transports(self) -> None:
        config = ucxx.get_config()
        active = sorted(ucxx.get_active_transports())
        logger.info("UCX %s: UCX_TLS=%s, active transports %s, RNDV_THRESH=%s",
                    ".".join(map(str, ucxx.get_ucx_version())), config.get("TLS"), active,
                    config.get("RNDV_THRESH"))
        if self._is_cuda and not any(t.startswith("cuda") for t in active):
            logger.warning("kv_cache is on CUDA but UCX has no CUDA transport (active: %s): "
                           "blocks would bounce through host memory over TCP. Set UCX_TLS to "
                           "e.g. cuda_copy,cuda_ipc,rc,tcp", active)

    # ---- both sides ------------------------------------------------------------------------

    async def _endpoint(self, cache: dict, peer_id: str, address: dict, deadline: float):
        async with self._connect_locks.setdefault(peer_id, asyncio.Lock()):
            ep = cache.get(peer_id)
            if ep is not None and not ep.closed:
                return ep
            try:
                worker_address = ucxx.get_ucx_address_from_buffer(bytes.fromhex(address["worker_address"]))
                ep = await asyncio.wait_for(ucxx.create_endpoint_from_worker_address(worker_address),
                                            remaining_s(deadline))
            except Exception as exc:  # noqa: BLE001 - a bad address or an unreachable peer
                raise TransferError(f"UCX connect to {peer_id} failed: {exc!r}") from exc
            cache[peer_id] = ep
            return ep

    # ---- decode side -----------------------------------------------------------------------

    async def recv(self, peer_id: str, peer_address: dict, tag: int, regions: list[torch.Tensor],
                   deadline: float, stop: asyncio.Event) -> None:
        ep = await self._endpoint(self._receiving, peer_id, peer_address, deadline)
        tasks = [asyncio.ensure_future(ep.recv(as_bytes(r), tag=tag + i, force_tag=True))
                 for i, r in enumerate(regions)]
        reason = await wait_all(tasks, deadline, stop)
        if reason is not None:
            if self._receiving.get(peer_id) is ep:
                del self._receiving[peer_id]
            await self._cancel(ep, tasks)
            raise TransferError(f"UCX receive from prefill {peer_id} failed: {reason}")

    # ---- prefill side ----------------------------------------------------------------------

    async def send(self, peer_id: str, peer_address: dict, tag: int,
                   regions: list[torch.Tensor], deadline: float) -> None:
        ep = await self._endpoint(self._sending, peer_id, peer_address, deadline)
        tasks = [asyncio.ensure_future(ep.send(as_bytes(r), tag=tag + i, force_tag=True))
                 for i, r in enumerate(regions)]
        reason = await wait_all(tasks, deadline, None)
        if reason is not None:
            if self._sending.get(peer_id) is ep:
                del self._sending[peer_id]  # never reuse an endpoint that failed
            await self._cancel(ep, tasks)
            raise TransferError(f"UCX send to decode {peer_id} failed: {reason}")

    # ---- teardown --------------------------------------------------------------------------

    async def _cancel(self, ep, tasks: list[asyncio.Future]) -> None:
        """Closes `ep` (cancelling its requests) and waits until none of `tasks` can touch memory."""
        started = time.monotonic()
        ep.abort(period=int(GRACE_S * 1e9))
        still = await retire(tasks, GRACE_S)
        if still:
            logger.error("%d UCX requests survived closing their endpoint; cancelling all "
                         "in-flight requests of the worker", len(still))
            ucxx.core._get_ctx().worker.cancel_inflight_requests(int(GRACE_S * 1e9), 3)
            still = await retire(still, GRACE_S)
        if still:
            logger.critical("%d UCX requests still running %.1f s after cancellation",
                            len(still), time.monotonic() - started)

    async def close(self) -> None:
        global _owner
        for ep in [*self._receiving.values(), *self._sending.values()]:
            ep.abort(period=int(0.5e9))
        self._receiving.clear()
        self._sending.clear()
        try:  # lets a later connector in this process start a fresh context on its own loop
            ucxx.reset()
        except Exception as exc:  # noqa: BLE001
            logger.warning("ucxx.reset() at close: %s", exc)
            ucxx.stop_notifier_thread()
        if _owner is self:
            _owner = None
