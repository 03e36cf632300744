"""Admission control: a bounded number of requests generate at once, a bounded number wait.

    arrive -> slot free?  yes -> admitted (runs) -> release
                          no  -> queue full? yes -> rejected (429, Retry-After)
                                             no  -> wait (FIFO) -> slot / timeout -> rejected (429)

A rejected request costs the workers nothing: it is refused before tokenization and routing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class AdmissionRejected(Exception):
    """The gateway is full; retry after `retry_after_s` seconds."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class AdmissionQueue:
    def __init__(self, max_inflight: int, max_queued: int, queue_timeout_s: float, retry_after_s: int = 1) -> None:
        if max_inflight < 1 or max_queued < 0:
            raise ValueError(f"need max_inflight >= 1 and max_queued >= 0, got {max_inflight}, {max_queued}")
        self.max_inflight, self.max_queued = max_inflight, max_queued
        self.queue_timeout_s, self.retry_after_s = queue_timeout_s, retry_after_s
        self._slots = asyncio.Semaphore(max_inflight)  # FIFO wake-up order
        self.num_inflight = 0
        self.num_queued = 0

    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Hold one generation slot for the body of the `async with`; raise AdmissionRejected when full."""
        await self._acquire()
        self.num_inflight += 1
        try:
            yield
        finally:
            self.num_inflight -= 1
            self._slots.release()

    async def _acquire(self) -> None:
        if not self._slots.locked() and self.num_queued == 0:
            await self._slots.acquire()  # returns at once: a slot is free
            return
        if self.num_queued >= self.max_queued:
            raise AdmissionRejected(
                f"the gateway is at capacity ({self.max_inflight} running, {self.num_queued} queued)",
                self.retry_after_s)
        self.num_queued += 1
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout=self.queue_timeout_s)
        except TimeoutError:
            raise AdmissionRejected(
                f"no generation slot became free within {self.queue_timeout_s:g} s", self.retry_after_s) from None
        finally:
            self.num_queued -= 1
