"""`BlockCopier`: moves runs of KV blocks between the device pool and host memory off the step loop.

One thread per engine takes copy jobs in FIFO order, so a restore queued after the offload that
fills the same host slot reads what that offload wrote. Each job is a list of (src, dst) tensor
views, one per run of adjacent blocks: the block-major layout makes a run one contiguous region,
so a run is one copy call whatever its length.

On CUDA the copies run on a side stream that first waits for what the compute stream had queued
when the job was submitted (a restored block may have been freed by a request whose last step is
still in flight); the copier thread, not the engine, waits for the stream. On CPU the copies run
on the thread itself (torch releases the GIL while it copies).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)


@dataclass
class CopyJob:
    kind: str
    """'offload' (device -> host) or 'restore' (host -> device)."""
    runs: list[tuple[torch.Tensor, torch.Tensor]]
    """(src, dst) views of equal shape, one per run of adjacent blocks."""
    request_id: str | None = None
    device_block_ids: list[int] = field(default_factory=list)
    host_slots: list[int] = field(default_factory=list)
    cancelled: bool = False
    error: str | None = None
    seconds: float = 0.0
    ready: object | None = None
    """CUDA event recorded on the compute stream at submission."""

    @property
    def nbytes(self) -> int:
        return sum(src.numel() * src.element_size() for src, _ in self.runs)


class BlockCopier:
    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if self._cuda else None
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self.on_done = _nothing
        """Called on the copier's thread after each job is queued for take_done()."""
        self._thread = threading.Thread(target=self._run, name="kv-host-copier", daemon=True)
        self._thread.start()

    def submit(self, job: CopyJob) -> None:
        """Queue `job` (engine thread); it comes back from `take_done()` once its copies ended."""
        if self._cuda:
            job.ready = torch.cuda.Event()
            job.ready.record(torch.cuda.current_stream(self._stream.device))
        self._jobs.put(job)

    def take_done(self) -> list[CopyJob]:
        done = []
        while True:
            try:
                done.append(self._done.get_nowait())
            except queue.Empty:
                return done

    def close(self, timeout_s: float = 5.0) -> None:
        self._jobs.put(None)
        self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            if not job.cancelled:
                started = time.perf_counter()
                try:
                    self._copy(job)
                except Exception as exc:  # a failed copy is reported; the engine recomputes
                    logger.warning("KV host %s failed: %r", job.kind, exc)
                    job.error = repr(exc)
                job.seconds = time.perf_counter() - started
            self._done.put(job)
            self.on_done()

    def _copy(self, job: CopyJob) -> None:
        if not self._cuda:
            for src, dst in job.runs:
                dst.copy_(src)
            return
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(job.ready)
            for src, dst in job.runs:
                dst.copy_(src, non_blocking=True)
        self._stream.synchronize()


def _nothing() -> None:
    """No one waits for a finished job (the engine polls every step)."""
