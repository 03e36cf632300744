"""What every data plane (UCX, NCCL) offers the connector, and helpers they share.

A data plane moves a list of contiguous regions (coalesced block runs, see block_runs.py) from
the prefill side's kv_cache to the decode side's. Both calls take an absolute `deadline`
(time.monotonic()) and end in exactly one of two ways: they return (every byte landed / was
read) or raise `TransferError`. When `recv` raises, no receive it posted can still write into the
regions: each backend cancels or tears down what it posted and waits for that to finish before
raising. That is the guarantee the decode side's load_failed / abort contract rests on.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

import torch

GRACE_S = 2.0
"""How long a backend waits for cancelled operations to retire before escalating."""


class TransferError(RuntimeError):
    """A transfer failed; the message says why (timeout, peer gone, rejected...)."""


class DataPlane(Protocol):
    name: str

    async def start(self) -> None: ...

    def address(self) -> dict:
        """What the decode side tells the prefill side so it can send ({'backend': name, ...})."""

    async def send(self, peer_id: str, peer_address: dict, tag: int,
                   regions: list[torch.Tensor], deadline: float) -> None: ...

    async def recv(self, peer_id: str, peer_address: dict, tag: int, regions: list[torch.Tensor],
                   deadline: float, stop: asyncio.Event) -> None:
        """`stop` set: the peer said no data will come; give up at once (TransferError)."""

    async def close(self) -> None: ...


def as_bytes(region: torch.Tensor):
    """A zero-copy byte view a transport can read or write: numpy on CPU (buffer protocol),
    the tensor itself on CUDA (__cuda_array_interface__). uint8 so bf16 needs no numpy dtype."""
    flat = region.reshape(-1).view(torch.uint8)
    return flat if flat.is_cuda else flat.numpy()


def remaining_s(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


async def wait_all(tasks: list[asyncio.Future], deadline: float, stop: asyncio.Event | None) -> str | None:
    """Waits until every task succeeded (-> None) or one failed, `stop` was set or the deadline
    passed (-> the reason). Never cancels the tasks: they may own buffers a transport writes."""
    pending = set(tasks)
    stopper = asyncio.ensure_future(stop.wait()) if stop is not None else None
    try:
        while pending:
            watch = pending | ({stopper} if stopper else set())
            done, _ = await asyncio.wait(watch, timeout=remaining_s(deadline),
                                         return_when=asyncio.FIRST_COMPLETED)
            if not done:
                return "timed out"
            if stopper in done:
                return "peer stopped the transfer"
            for task in done:
                if task.exception() is not None:
                    return f"{type(task.exception()).__name__}: {task.exception()}"
            pending -= done
        return None
    finally:
        if stopper is not None:
            stopper.cancel()


async def retire(tasks: list[asyncio.Future], timeout_s: float) -> list[asyncio.Future]:
    """Waits up to timeout_s for tasks to end (after their operations were cancelled); returns
    those still running. Consumes exceptions so none is logged as 'never retrieved'."""
    pending = [t for t in tasks if not t.done()]
    if pending:
        _, still = await asyncio.wait(pending, timeout=timeout_s)
        pending = list(still)
    for t in tasks:
        if t.done() and not t.cancelled():
            t.exception()
    return pending
