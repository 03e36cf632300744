"""A step's grammar bitmask, off the step loop's thread: matchers advanced and rows filled on K workers.

    fill = filler.start(new_tokens, grammars)   the workers advance the matchers by the previous
                                                step's tokens (returns once they all have), then
                                                fill this step's rows, without the GIL
    ... the step loop books the previous step's tokens meanwhile ...
    fill.result()  ─▶ (bitmask [N, ceil(V/32)] int32, grammar rows [k] int32) on the device, or None

One row of a 128k vocabulary takes tens of microseconds to fill and a long token several to
accept, so a batch of hundreds done on the step loop's thread costs the step milliseconds. Row i
belongs to worker i % K, which accepts that row's new token and then fills it: no row waits for
another worker, and each worker makes two xgrammar calls a step (batched accept, batched fill), in
which the GIL is released. `start` blocks until every worker has accepted: a thread that needs the
GIL while the step loop runs Python waits up to the interpreter's switch interval (5 ms), longer
than the whole fill, so the workers take their GIL turns while the step loop waits.

The rows are written into one reused (pinned, on CUDA) host buffer, bitmask and row indices side
by side, which reaches the device in one copy; rows without a live grammar are neither filled nor
listed, so the mask kernel leaves their logits alone. Between `start` and `result` the caller must
not touch a matcher (a fill works on the matcher's state in place); `RequestGrammar.terminated` is a
plain attribute, set before `start` returns.
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
"""Longest wait for a worker (its work takes milliseconds; longer means it is gone)."""


def default_threads() -> int:
    """Half the cores this process may run on, at most 16: the step loop and the device's host
    work keep the rest."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    return max(1, min(16, cores // 2))


class _Share:
    """One worker's part of a step: the tokens its rows' matchers accept, then the rows it fills."""

    def __init__(self) -> None:
        self.accepts: list[tuple[int, RequestGrammar, int]] = []
        """(index in the step's new tokens, grammar, token)."""
        self.fills: list[tuple[int, RequestGrammar]] = []
        """(row, grammar)."""
        self.filled: list[int] = []
        self.accepted, self.done = threading.Event(), threading.Event()
        self.error: BaseException | None = None


class StepFill:
    """One step's work on the workers; `accepted` is known when `start` returns."""

    def __init__(self, filler: BitmaskFiller, shares: list[_Share], num_tokens: int, num_rows: int) -> None:
        self.filler, self.shares, self.num_rows = filler, shares, num_rows
        self.accepted = [True] * num_tokens
        """Whether each new token was accepted by its grammar (False: a masking bug, not input)."""
        self.filled_inline: tuple[torch.Tensor, torch.Tensor] | None = None
        """With no workers (`num_threads` 0): the bitmask, already filled by `start`."""

    def result(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Wait for the fill; the bitmask and its grammar rows on the device (None: no live row)."""
        if not self.shares:
            return self.filled_inline
        for share in self.shares:
            _wait(share.done, "fill")
            if share.error is not None:
                raise share.error
        rows = sorted(row for share in self.shares for row in share.filled)
        return self.filler.to_device(self.num_rows, rows) if rows else None


class BitmaskFiller:
    """Fills steps' bitmasks for one engine on `num_threads` workers (started on first use)."""

    def __init__(self, vocab_size: int, device: torch.device, num_threads: int | None = None) -> None:
        self.width, self.device = bitmask_width(vocab_size), device
        self.num_threads = 0 if num_threads is None else num_threads  # 0 measured fastest (benchmarks.md s. 13)
        """Workers; 0: accept and fill on the step loop's thread, with xgrammar's own threads."""
        self._batch = xgr.BatchGrammarMatcher(self.num_threads or default_threads())  # synchronous calls
        self._host = self._device_buf = torch.empty(0, dtype=torch.int32)
        self._copied: torch.cuda.Event | None = None
        self._workers: list[_Worker] = []
        self._last: StepFill | None = None

    def build(self, grammars: Sequence[RequestGrammar | None]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Fill on this thread and wait (synchronous steps); None when no row has a live grammar."""
        rows = [i for i, g in enumerate(grammars) if g is not None and not g.terminated]
        if not rows:
            return None
        self.wait()
        self._reserve(len(grammars))
        self._batch.batch_fill_next_token_bitmask([grammars[i].matcher for i in rows], self.host_bitmask(len(grammars)),
                                                  rows)
        return self.to_device(len(grammars), rows)

    def start(self, new_tokens: Sequence[tuple[RequestGrammar, int]],
              grammars: Sequence[RequestGrammar | None]) -> StepFill:
        """Accept each (grammar, token) of `new_tokens`, then fill the live rows of `grammars`.
        Returns once every token is accepted (StepFill.accepted), the fill still running."""
        if not self.num_threads:
            return self._start_inline(new_tokens, grammars)
        self.wait()
        self._reserve(len(grammars))
        shares = self._split(new_tokens, grammars)
        fill = self._last = StepFill(self, [s for s in shares if s.accepts or s.fills], len(new_tokens), len(grammars))
        for worker, share in zip(self._running_workers(), shares):
            if share.accepts or share.fills:
                worker.jobs.put((share, fill))
        for share in fill.shares:
            _wait(share.accepted, "accept")
        errors = [share.error for share in fill.shares if share.error is not None]
        if errors:
            self.wait()
            raise errors[0]
        return fill

    def _start_inline(self, new_tokens: Sequence[tuple[RequestGrammar, int]],
                      grammars: Sequence[RequestGrammar | None]) -> StepFill:
        """Both batched calls on this thread (each spreads over xgrammar's threads, GIL released):
        no hand-off to workers, whose GIL turns can cost more than the work (section 13 of
        docs/benchmarks.md measured both)."""
        fill = self._last = StepFill(self, [], len(new_tokens), len(grammars))
        if new_tokens:
            results = self._batch.batch_accept_token([g.matcher for g, _ in new_tokens], [t for _, t in new_tokens])
            for index, ((grammar, token_id), accepted) in enumerate(zip(new_tokens, results)):
                grammar.note_accepted(token_id, accepted)
                fill.accepted[index] = accepted
        fill.filled_inline = self.build(grammars)
        return fill

    def _split(self, new_tokens, grammars) -> list[_Share]:
        shares = [_Share() for _ in range(self.num_threads)]
        owner: dict[int, int] = {}
        for row, grammar in enumerate(grammars):
            if grammar is not None:
                owner[id(grammar)] = row % self.num_threads
                shares[row % self.num_threads].fills.append((row, grammar))
        for index, (grammar, token_id) in enumerate(new_tokens):
            shares[owner.get(id(grammar), index % self.num_threads)].accepts.append((index, grammar, token_id))
        return shares

    def wait(self) -> None:
        """Wait for the last started step's workers to end (a failed step may have left them running)."""
        if self._last is not None:
            for share in self._last.shares:
                share.done.wait(FILL_TIMEOUT_S)

    def close(self) -> None:
        for worker in self._workers:
            worker.jobs.put(None)
        self._workers = []

    def _running_workers(self) -> list[_Worker]:
        if not self._workers:
            self._workers = [_Worker(self, i) for i in range(self.num_threads)]
        return self._workers

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


def _wait(event: threading.Event, what: str) -> None:
    if not event.wait(FILL_TIMEOUT_S):
        raise RuntimeError(f"a structured-output worker did not {what} within {FILL_TIMEOUT_S} s")


class _Worker:
    """One thread: for each step, one batched accept and one batched fill of its rows."""

    def __init__(self, filler: BitmaskFiller, index: int) -> None:
        self.filler, self.jobs = filler, queue.SimpleQueue()
        self._batch = xgr.BatchGrammarMatcher(1)
        threading.Thread(target=self._serve, name=f"grammar-fill-{index}", daemon=True).start()

    def _serve(self) -> None:
        while (job := self.jobs.get()) is not None:
            share, fill = job
            try:
                self._accept(share, fill)
            except BaseException as exc:  # noqa: BLE001 - raised again on the step loop's thread
                share.error = exc
                share.accepted.set()
                share.done.set()
                continue
            share.accepted.set()
            try:
                self._fill(share, fill.num_rows)
            except BaseException as exc:  # noqa: BLE001
                share.error = exc
            share.done.set()

    def _accept(self, share: _Share, fill: StepFill) -> None:
        if not share.accepts:
            return
        matchers = [grammar.matcher for _, grammar, _ in share.accepts]
        results = self._batch.batch_accept_token(matchers, [token_id for _, _, token_id in share.accepts])
        for (index, grammar, token_id), accepted in zip(share.accepts, results):
            grammar.note_accepted(token_id, accepted)
            fill.accepted[index] = accepted

    def _fill(self, share: _Share, num_rows: int) -> None:
        live = [(row, grammar) for row, grammar in share.fills if not grammar.terminated]
        if live:
            self._batch.batch_fill_next_token_bitmask([g.matcher for _, g in live], self.filler.host_bitmask(num_rows),
                                                      [row for row, _ in live])
        share.filled = [row for row, _ in live]
