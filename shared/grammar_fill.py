"""A step's grammar bitmask: the matchers accept on the step loop, the rows fill beside it.

    fill = filler.start(new_tokens, grammars)   the matchers take the previous step's tokens (one
                                                batched call, on this thread: `terminated` is
                                                known when it returns), then the fill of this
                                                step's rows is handed to the grammar thread
    ... the step loop books the previous step's tokens meanwhile ...
    fill.result()  ─▶ (bitmask [N, ceil(V/32)] int32, grammar rows [k] int32) on the device, or None

One row of a 128k vocabulary takes tens of microseconds to fill, so a batch of hundreds costs
milliseconds: xgrammar spreads one batched fill over its own `num_threads` C++ threads, with the
GIL released, and that call runs on one thread of ours (the grammar thread) while the step loop
books outputs in Python. Accepting a token is a few microseconds and xgrammar's batched accept is
one sequential C++ loop, so it stays on the step loop, which needs its result (`terminated`,
rejections) for the very outputs it books.

The hand-off is a handshake: `start` waits until the grammar thread has taken the job. A thread
that wakes while another runs Python waits for the GIL up to the interpreter's switch interval
(5 ms), far longer than the fill; while the step loop waits on the handshake it holds no GIL, so
the grammar thread is inside xgrammar's call within one wake-up (docs/benchmarks.md, section 14).
When the fill returns, the grammar thread needs the GIL once more, which it gets as soon as the
step loop waits in `result`.

The rows are written into one reused (pinned, on CUDA) host buffer, bitmask and row indices side
by side, which reaches the device in one copy; rows without a live grammar are neither filled nor
listed, so the mask kernel leaves their logits alone. Between `start` and `result` the caller must
not touch a matcher (the fill works on the matchers' state in place); `RequestGrammar.terminated`
is a plain attribute, set before `start` returns.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Sequence

import torch
import xgrammar as xgr

from splitserve.shared.grammar import RequestGrammar, bitmask_width

FILL_TIMEOUT_S = 60.0
"""Longest wait for the grammar thread (its work takes milliseconds; longer means it is gone)."""


def default_threads() -> int:
    """Half the cores this process may run on, at most 16: the step loop and the device's host
    work keep the rest."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    return max(1, min(16, cores // 2))


class _FillJob:
    """One step's fill: the live rows and their matchers, and how it went."""

    def __init__(self, matchers: list[xgr.GrammarMatcher], bitmask: torch.Tensor, rows: list[int]) -> None:
        self.matchers, self.bitmask, self.rows = matchers, bitmask, rows
        self.taken, self.done = threading.Event(), threading.Event()
        self.error: BaseException | None = None


class StepFill:
    """One step's fill on the grammar thread; `accepted` is known when `start` returns."""

    def __init__(self, filler: BitmaskFiller, num_rows: int, job: _FillJob | None) -> None:
        self.filler, self.num_rows, self.job = filler, num_rows, job
        self.accepted: list[bool] = []
        """Whether each new token was accepted by its grammar (False: a masking bug, not input)."""

    def result(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Wait for the fill; the bitmask and its grammar rows on the device (None: no live row)."""
        if self.job is None:
            return None
        _wait(self.job.done, "fill")
        if self.job.error is not None:
            raise self.job.error
        return self.filler.to_device(self.num_rows, self.job.rows)


class BitmaskFiller:
    """Fills steps' bitmasks for one engine; xgrammar's fill runs on `num_threads` threads."""

    def __init__(self, vocab_size: int, device: torch.device, num_threads: int | None = None) -> None:
        self.width, self.device = bitmask_width(vocab_size), device
        self.num_threads = default_threads() if num_threads is None else num_threads
        """xgrammar's threads for one batched fill (its pool, started per call)."""
        self._batch = xgr.BatchGrammarMatcher(self.num_threads)  # used by one thread at a time
        self._host = self._device_buf = torch.empty(0, dtype=torch.int32)
        self._copied: torch.cuda.Event | None = None
        self._thread: _GrammarThread | None = None
        self._last: _FillJob | None = None

    def build(self, grammars: Sequence[RequestGrammar | None]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Fill on this thread and wait (synchronous steps); None when no row has a live grammar."""
        job = self._job(grammars)
        if job is None:
            return None
        self._batch.batch_fill_next_token_bitmask(job.matchers, job.bitmask, job.rows)
        return self.to_device(len(grammars), job.rows)

    def start(self, new_tokens: Sequence[tuple[RequestGrammar, int]],
              grammars: Sequence[RequestGrammar | None]) -> StepFill:
        """Accept each (grammar, token) of `new_tokens` here, then hand the fill of the live rows
        of `grammars` to the grammar thread. Returns once it has taken the job (StepFill.accepted
        and every `terminated` already hold)."""
        self.wait()
        accepted = accept_tokens(new_tokens)
        fill = self.start_fill(grammars)
        fill.accepted = accepted
        return fill

    def start_fill(self, grammars: Sequence[RequestGrammar | None]) -> StepFill:
        """Hand the fill of the live rows of `grammars` to the grammar thread; returns once taken."""
        job = self._job(grammars)
        if job is not None:
            self._running_thread().run(job)
            self._last = job
        return StepFill(self, len(grammars), job)

    def _job(self, grammars: Sequence[RequestGrammar | None]) -> _FillJob | None:
        rows = [i for i, g in enumerate(grammars) if g is not None and not g.terminated]
        if not rows:
            return None
        self.wait()
        self._reserve(len(grammars))
        return _FillJob([grammars[i].matcher for i in rows], self.host_bitmask(len(grammars)), rows)

    def wait(self) -> None:
        """Wait for the last started fill to end (a failed step may have left it running)."""
        if self._last is not None and self._last.done.wait(FILL_TIMEOUT_S):
            self._last = None

    def close(self) -> None:
        if self._thread is not None:
            self._thread.stop()
            self._thread = None

    def _running_thread(self) -> _GrammarThread:
        if self._thread is None:
            self._thread = _GrammarThread(self._batch)
        return self._thread

    def host_bitmask(self, num_rows: int) -> torch.Tensor:
        return self._host[: num_rows * self.width].view(num_rows, self.width)

    def to_device(self, num_rows: int, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Bitmask [N, W] and rows [k], the rows after the mask in one buffer: one host -> device copy."""
        size = num_rows * self.width
        self._host[size: size + len(rows)] = torch.tensor(rows, dtype=torch.int32)
        flat = self._host[: size + len(rows)]
        if self.device.type == "cuda":
            flat = self._device_buf[: flat.numel()].copy_(flat, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        return flat[:size].view(num_rows, self.width), flat[size:]

    def _reserve(self, num_rows: int) -> None:
        """Room for N rows and their indices; first, the previous step's copy out of it has ended."""
        if self._copied is not None:
            self._copied.synchronize()
        numel = num_rows * (self.width + 1)
        if self._host.numel() >= numel:
            return
        numel = max(numel, 2 * self._host.numel())
        pinned = self.device.type == "cuda"
        self._host = torch.empty(numel, dtype=torch.int32, pin_memory=pinned)
        if pinned:
            self._device_buf = torch.empty(numel, dtype=torch.int32, device=self.device)


def accept_tokens(new_tokens: Sequence[tuple[RequestGrammar, int]]) -> list[bool]:
    """Advance each grammar by its token in one batched call (GIL released); whether each took it."""
    if not new_tokens:
        return []
    results = xgr.BatchGrammarMatcher.batch_accept_token([g.matcher for g, _ in new_tokens],
                                                         [t for _, t in new_tokens])
    for (grammar, token_id), accepted in zip(new_tokens, results):
        grammar.note_accepted(token_id, accepted)
    return results


def _wait(event: threading.Event, what: str) -> None:
    if not event.wait(FILL_TIMEOUT_S):
        raise RuntimeError(f"the structured-output grammar thread did not {what} within {FILL_TIMEOUT_S} s")


class _GrammarThread:
    """The thread that makes each step's batched fill call while the step loop books outputs."""

    def __init__(self, batch: xgr.BatchGrammarMatcher) -> None:
        self._batch, self._jobs = batch, queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="grammar-fill", daemon=True)
        self._thread.start()

    def run(self, job: _FillJob) -> None:
        """Hand `job` over and wait until it is taken (the handshake of the module docstring)."""
        self._jobs.put(job)
        _wait(job.taken, "take a fill")

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(FILL_TIMEOUT_S)

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            job.taken.set()
            try:
                self._batch.batch_fill_next_token_bitmask(job.matchers, job.bitmask, job.rows)
            except BaseException as exc:  # noqa: BLE001 - raised again on the step loop's thread
                job.error = exc
            job.done.set()
