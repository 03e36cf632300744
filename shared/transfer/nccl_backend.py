"""NCCL data plane: torch.distributed point-to-point between one prefill rank and one decode rank.

The connector builds its own two-rank process group from a TCPStore at `nccl_init_method`
(rank 0 hosts the store), without touching torch.distributed's default group, so the engine may
still use that for tensor parallelism. CUDA kv_cache -> ProcessGroupNCCL; CPU kv_cache ->
ProcessGroupGloo, which runs the same code path in CPU tests. Control stays on ZMQ.

Limits (deliberately simple):
- one prefill and one decode per group (world size 2); a deployment with many pairs runs one
  connector per pair;
- transfers are serialized (the decode side asks for the next load only after the previous one
  ended), because NCCL matches sends to receives by order, not by tag;
- a posted NCCL/gloo receive cannot be cancelled. A transfer that times out or fails therefore
  aborts the whole group and marks the backend broken: every later load fails at once with that
  reason (the decode side recomputes) until the connector is rebuilt.

All blocking torch.distributed calls run on one dedicated thread, in order.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import logging
import socket
import time
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from .data_plane import GRACE_S, TransferError, remaining_s

logger = logging.getLogger(__name__)


class NcclDataPlane:
    name = "nccl"

    def __init__(self, init_method: str, rank: int, world_size: int, kv_cache: torch.Tensor,
                 timeout_s: float):
        self._url = urlparse(init_method)
        self._rank, self._world_size = rank, world_size
        self._is_cuda = kv_cache.is_cuda
        self._timeout_s = timeout_s
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kv-nccl")
        self._store = None
        self._listener: socket.socket | None = None
        self._group = None
        self._ready: asyncio.Future | None = None
        self._broken: str | None = None

    async def start(self) -> None:
        # The group forms when both ranks arrive; loads wait for it (bounded by their deadline).
        self._ready = asyncio.get_running_loop().run_in_executor(self._thread, self._init_group)

    def _init_group(self) -> None:
        timeout = datetime.timedelta(seconds=max(30.0, self._timeout_s))
        listen_fd = self._listen_socket().fileno() if self._rank == 0 else None
        self._store = dist.TCPStore(self._url.hostname, self._url.port, self._world_size,
                                    is_master=self._rank == 0, timeout=timeout, master_listen_fd=listen_fd)
        if self._is_cuda:
            self._group = dist.ProcessGroupNCCL(self._store, self._rank, self._world_size)
        else:
            self._group = dist.ProcessGroupGloo(self._store, self._rank, self._world_size, timeout)
        logger.info("KV transfer group formed: %s rank %d of %d via %s",
                    "nccl" if self._is_cuda else "gloo", self._rank, self._world_size, self._url.geturl())

    def _listen_socket(self) -> socket.socket:
        """The rendezvous socket, bound to the init method's host only: TCPStore given just a
        port would listen on every interface."""
        family = socket.AF_INET6 if ":" in self._url.hostname else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((self._url.hostname, self._url.port))
        self._listener.listen()
        logger.info("KV transfer rendezvous listens on %s:%d", *self._listener.getsockname()[:2])
        return self._listener

    def address(self) -> dict:
        return {"backend": self.name, "rank": self._rank}

    async def _ensure_group(self, deadline: float) -> None:
        if self._broken:
            raise TransferError(f"nccl transfer group is broken: {self._broken}")
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), remaining_s(deadline))
        except asyncio.TimeoutError:
            raise TransferError("nccl transfer group not formed yet (peer rank absent)") from None
        except Exception as exc:  # noqa: BLE001
            self._broken = f"group init failed: {exc!r}"
            raise TransferError(self._broken) from exc

    async def send(self, peer_id: str, peer_address: dict, tag: int,
                   regions: list[torch.Tensor], deadline: float) -> None:
        await self._ensure_group(deadline)
        peer_rank = peer_address["rank"]
        await self._run(lambda: [self._group.send([r], peer_rank, _tag(tag, i))
                                 for i, r in enumerate(regions)], deadline, "send")

    async def recv(self, peer_id: str, peer_address: dict, tag: int, regions: list[torch.Tensor],
                   deadline: float, stop: asyncio.Event) -> None:
        # `stop` cannot shorten a posted receive here: only the deadline (then the group breaks).
        await self._ensure_group(deadline)
        peer_rank = 1 - self._rank
        await self._run(lambda: [self._group.recv([r], peer_rank, _tag(tag, i))
                                 for i, r in enumerate(regions)], deadline, "recv")

    async def _run(self, post, deadline: float, what: str) -> None:
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(self._thread, self._post_and_wait, post, deadline)
        try:
            await asyncio.wait_for(asyncio.shield(job), remaining_s(deadline) + GRACE_S)
        except Exception as exc:  # noqa: BLE001 - timeout or a gloo/nccl error
            reason = f"{what} failed: {type(exc).__name__}: {exc}"
            self._break(reason)
            raise TransferError(reason) from exc

    def _post_and_wait(self, post, deadline: float) -> None:
        works = post()
        for work in works:
            if self._is_cuda:  # NCCL: poll the work's CUDA event, then make the data host-visible
                while not work.is_completed():
                    if time.monotonic() > deadline:
                        raise TimeoutError("nccl transfer timed out")
                    time.sleep(0.0005)
                torch.cuda.current_stream().synchronize()
            else:  # gloo completes a send/recv only inside wait()
                work.wait(datetime.timedelta(seconds=max(0.001, remaining_s(deadline))))

    def _break(self, reason: str) -> None:
        """A posted receive cannot be cancelled: abort the group so nothing more lands."""
        if self._broken:
            return
        self._broken = reason
        logger.error("nccl transfer group broken: %s", reason)
        try:
            self._group.abort()
        except Exception as exc:  # noqa: BLE001
            logger.warning("aborting the transfer group: %s", exc)

    async def close(self) -> None:
        if self._group is not None and not self._broken:
            try:
                self._group.shutdown()
            except Exception as exc:  # noqa: BLE001
                logger.debug("transfer group shutdown: %s", exc)
        self._thread.shutdown(wait=False, cancel_futures=True)
        if self._listener is not None:
            self._listener.close()


def _tag(tag: int, run_index: int) -> int:
    """gloo tags are 32-bit: low 15 bits of the transfer's random tag, then the run index."""
    return ((tag >> 16) & 0x7FFF) << 16 | run_index
