"""A step's grammar bitmask, on one grammar thread beside the step loop: accept, then fill.

    fill = filler.start(new_tokens, grammars)   hands the step to the grammar thread (returns
                                                once it has taken it)
    ... the step loop books what of the previous step needs no grammar ...
    fill.wait_accepted()                        the matchers took the previous step's tokens:
                                                `terminated` and rejections are known
    ... the step loop books the grammar rows' outputs, the rows fill meanwhile ...
    fill.result()  ─▶ (bitmask [N, ceil(V/32)] int32, grammar rows [k] int32) on the device, or None

The grammar thread makes two xgrammar calls a step, each with the GIL released: the batched accept
(one sequential C++ loop, a few µs a token) and the batched fill, which xgrammar spreads over its
own `num_threads` C++ threads (tens of µs a row of a 128k vocabulary). Both run while the step loop
books outputs in Python.

Every hand-off is arranged so that no thread waits for the GIL while another runs Python, which
would last up to the interpreter's switch interval (5 ms), longer than the work: `start` waits
(holding no GIL) until the grammar thread has taken the job; the thread needs the GIL between its
two calls, which it gets when the step loop waits in `wait_accepted`, and after the fill, which it
gets when the step loop waits in `result` (docs/benchmarks.md, section 15).

The rows are written into one reused (pinned, on CUDA) host buffer, bitmask and row indices side
by side, which reaches the device in one copy; rows without a live grammar are neither filled nor
listed, so the mask kernel leaves their logits alone. Between `start` and `result` the caller must
not touch a matcher, and must not read `RequestGrammar.terminated` before `wait_accepted`.
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


class _StepJob:
    """One step's work on the grammar thread: accept the new tokens, then fill the live rows."""

    def __init__(self, new_tokens: list[tuple[RequestGrammar, int]], grammars: list[RequestGrammar | None],
                 bitmask: torch.Tensor) -> None:
        self.new_tokens, self.grammars, self.bitmask = new_tokens, grammars, bitmask
        self.accepted: list[bool] = []
        self.rows: list[int] = []
        """The rows whose grammar is live once the tokens are in (the ones filled)."""
        self.taken, self.accept_done, self.done = threading.Event(), threading.Event(), threading.Event()
        self.error: BaseException | None = None


class StepFill:
    """One step's accept and fill on the grammar thread."""

    def __init__(self, filler: BitmaskFiller, num_rows: int, job: _StepJob | None) -> None:
        self.filler, self.num_rows, self.job = filler, num_rows, job

    def wait_accepted(self) -> list[bool]:
        """Wait for the accepts: whether each new token was accepted by its grammar (False: a
        masking bug, not input). Every `terminated` holds once this returns."""
        if self.job is None:
            return []
        _wait(self.job.accept_done, "accept")
        if self.job.error is not None:
            raise self.job.error
        return self.job.accepted

    def result(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Wait for the fill; the bitmask and its grammar rows on the device (None: no live row)."""
        self.wait_accepted()
        if self.job is None:
            return None
        _wait(self.job.done, "fill")
        if self.job.error is not None:
            raise self.job.error
        return self.filler.to_device(self.num_rows, self.job.rows) if self.job.rows else None


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
        self._last: _StepJob | None = None

    def build(self, grammars: Sequence[RequestGrammar | None]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Fill on this thread and wait (synchronous steps); None when no row has a live grammar."""
        rows = live_rows(grammars)
        if not rows:
            return None
        self.wait()
        self._reserve(len(grammars))
        self._batch.batch_fill_next_token_bitmask([grammars[i].matcher for i in rows], self.host_bitmask(len(grammars)),
                                                  rows)
        return self.to_device(len(grammars), rows)

    def start(self, new_tokens: Sequence[tuple[RequestGrammar, int]],
              grammars: Sequence[RequestGrammar | None]) -> StepFill:
        """Hand the grammar thread this step: accept each (grammar, token) of `new_tokens`, then
        fill the rows of `grammars` still live. Returns once the thread has taken it; until
        `wait_accepted` returns, no `terminated` may be read, and until `result`, no matcher touched."""
        self.wait()
        if not new_tokens and not any(g is not None for g in grammars):
            return StepFill(self, len(grammars), None)
        self._reserve(len(grammars))
        job = _StepJob(list(new_tokens), list(grammars), self.host_bitmask(len(grammars)))
        self._running_thread().run(job)
        self._last = job
        return StepFill(self, len(grammars), job)

    def wait(self) -> None:
        """Wait for the last started step's job to end (a failed step may have left it running)."""
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


def live_rows(grammars: Sequence[RequestGrammar | None]) -> list[int]:
    return [i for i, g in enumerate(grammars) if g is not None and not g.terminated]


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
    """The thread that makes each step's batched accept and fill calls while the step loop books outputs."""

    def __init__(self, batch: xgr.BatchGrammarMatcher) -> None:
        self._batch, self._jobs = batch, queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="grammar-fill", daemon=True)
        self._thread.start()

    def run(self, job: _StepJob) -> None:
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
                job.accepted = accept_tokens(job.new_tokens)
                job.rows = live_rows(job.grammars)
            except BaseException as exc:  # noqa: BLE001 - raised again on the step loop's thread
                job.error = exc
            job.accept_done.set()  # the step loop books while the rows fill
            if job.error is None and job.rows:
                self._fill(job)
            job.done.set()

    def _fill(self, job: _StepJob) -> None:
        try:
            self._batch.batch_fill_next_token_bitmask([job.grammars[i].matcher for i in job.rows], job.bitmask, job.rows)
        except BaseException as exc:  # noqa: BLE001
            job.error = exc
