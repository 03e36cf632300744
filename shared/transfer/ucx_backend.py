"""UCX data plane over ucxx: the decode side listens, the prefill side connects and sends.

Connections: the prefill side keeps one endpoint per decode instance (created on first use,
dropped on any failure so a restarted or vanished peer is reconnected, never reused). Right after
connecting it sends a hello carrying its instance id, which is how the decode side knows which
accepted endpoint belongs to which prefill instance.

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

import numpy as np
import torch

from .data_plane import GRACE_S, TransferError, as_bytes, remaining_s, retire, wait_all

# Importing ucxx sets UCX variables (e.g. UCX_RNDV_FRAG_MEM_TYPE) that UCX 1.21 warns about at
# every context creation when no CUDA transport is loaded; silence that before the import.
os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
import ucxx  # noqa: E402

logger = logging.getLogger(__name__)

HELLO_BYTES = 64  # a uuid4 string (36 bytes), zero-padded
_owner: object | None = None  # ucxx has one context per process: one UCX data plane at a time


class UcxDataPlane:
    name = "ucx"

    def __init__(self, instance_id: str, host: str, port: int, tls: str | None, listen: bool,
                 kv_cache: torch.Tensor):
        self._instance_id = instance_id
        self._host, self._port, self._tls, self._listen = host, port, tls, listen
        self._is_cuda = kv_cache.is_cuda
        self._listener = None
        self._accepted: dict[str, object] = {}        # decode side: prefill instance id -> endpoint
        self._accepted_event: dict[str, asyncio.Event] = {}
        self._connected: dict[str, object] = {}       # prefill side: decode instance id -> endpoint
        self._connect_locks: dict[str, asyncio.Lock] = {}

    async def start(self) -> None:
        global _owner
        if _owner is not None:
            raise RuntimeError("a UCX KV connector is already running in this process "
                               "(ucxx keeps one context per process); use role='both'")
        _owner = self
        # Created on this (the connector's) loop: ucxx binds its notifier thread to it.
        # Python futures + notifier thread: waiting requests cost no CPU (wait_yield polls).
        ucxx.init(options={"TLS": self._tls} if self._tls else {}, enable_python_future=True)
        self._log_transports()
        if self._listen:
            self._listener = ucxx.create_listener(self._on_connect, port=self._port or None)
            logger.info("UCX listener on %s:%d", self._host, self._listener.port)

    def address(self) -> dict:
        if self._listener is None:
            raise RuntimeError("this UCX data plane does not listen (role 'prefill')")
        return {"backend": self.name, "host": self._host, "port": self._listener.port}

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

    # ---- decode side -----------------------------------------------------------------------

    async def _on_connect(self, ep) -> None:
        hello = np.zeros(HELLO_BYTES, dtype=np.uint8)
        try:
            await asyncio.wait_for(ep.recv(hello), GRACE_S)
        except Exception as exc:  # noqa: BLE001 - a bad peer must not kill the listener
            logger.warning("UCX peer connected without a hello (%s); closing it", exc)
            ep.abort()
            return
        peer_id = bytes(hello).rstrip(b"\0").decode()
        old = self._accepted.pop(peer_id, None)
        if old is not None:
            old.abort()
        self._accepted[peer_id] = ep
        self._accepted_event.setdefault(peer_id, asyncio.Event()).set()
        logger.info("UCX connection from prefill %s", peer_id)

    async def _accepted_endpoint(self, peer_id: str, deadline: float):
        ep = self._accepted.get(peer_id)
        while ep is None or ep.closed:
            event = self._accepted_event.setdefault(peer_id, asyncio.Event())
            event.clear()
            try:
                await asyncio.wait_for(event.wait(), remaining_s(deadline))
            except asyncio.TimeoutError:
                raise TransferError(f"prefill {peer_id} never connected its UCX endpoint") from None
            ep = self._accepted.get(peer_id)
        return ep

    async def recv(self, peer_id: str, tag: int, regions: list[torch.Tensor], deadline: float,
                   stop: asyncio.Event) -> None:
        ep = await self._accepted_endpoint(peer_id, deadline)
        tasks = [asyncio.ensure_future(ep.recv(as_bytes(r), tag=tag + i, force_tag=True))
                 for i, r in enumerate(regions)]
        reason = await wait_all(tasks, deadline, stop)
        if reason is not None:
            if self._accepted.get(peer_id) is ep:
                del self._accepted[peer_id]
            await self._cancel(ep, tasks)
            raise TransferError(f"UCX receive from prefill {peer_id} failed: {reason}")

    # ---- prefill side ----------------------------------------------------------------------

    async def _connected_endpoint(self, peer_id: str, address: dict, deadline: float):
        async with self._connect_locks.setdefault(peer_id, asyncio.Lock()):
            ep = self._connected.get(peer_id)
            if ep is not None and not ep.closed:
                return ep
            try:
                ep = await asyncio.wait_for(
                    ucxx.create_endpoint(address["host"], address["port"],
                                         connect_timeout=max(0.1, remaining_s(deadline))),
                    remaining_s(deadline))
                hello = np.zeros(HELLO_BYTES, dtype=np.uint8)
                hello[:len(self._instance_id)] = np.frombuffer(self._instance_id.encode(), np.uint8)
                await asyncio.wait_for(ep.send(hello), remaining_s(deadline))
            except Exception as exc:  # noqa: BLE001
                raise TransferError(f"UCX connect to decode {peer_id} at "
                                    f"{address.get('host')}:{address.get('port')} failed: {exc!r}") from exc
            self._connected[peer_id] = ep
            return ep

    async def send(self, peer_id: str, peer_address: dict, tag: int,
                   regions: list[torch.Tensor], deadline: float) -> None:
        ep = await self._connected_endpoint(peer_id, peer_address, deadline)
        tasks = [asyncio.ensure_future(ep.send(as_bytes(r), tag=tag + i, force_tag=True))
                 for i, r in enumerate(regions)]
        reason = await wait_all(tasks, deadline, None)
        if reason is not None:
            if self._connected.get(peer_id) is ep:
                del self._connected[peer_id]  # never reuse an endpoint that failed
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
        for ep in [*self._accepted.values(), *self._connected.values()]:
            ep.abort(period=int(0.5e9))
        self._accepted.clear()
        self._connected.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        try:  # lets a later connector in this process start a fresh context on its own loop
            ucxx.reset()
        except Exception as exc:  # noqa: BLE001
            logger.warning("ucxx.reset() at close: %s", exc)
            ucxx.stop_notifier_thread()
        if _owner is self:
            _owner = None
