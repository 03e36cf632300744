"""A step's grammar bitmask: every row filled in one batched xgrammar call, off the step loop's thread.

    filler.start(grammars) ─▶ BitmaskFill   a worker thread runs xgrammar's batched fill on its own
                                            C++ threads, without the GIL
    ... the step loop goes on meanwhile (it books the previous step's tokens) ...
    fill.result()          ─▶ (bitmask [N, ceil(V/32)] int32, grammar rows [k] int32), on the device

One row of a 128k vocabulary takes tens of microseconds to fill, so a batch of hundreds cannot be
filled on the step loop's thread without costing the step milliseconds. The rows are written into
one reused (pinned, on CUDA) host buffer, bitmask and row indices side by side, which reaches the
device in one copy; rows without a live grammar are neither filled nor copied into the mask's
indices, so the mask kernel leaves their logits alone.

The caller must not touch a matcher between `start` and `result` (xgrammar's fill works on the
matcher's state in place); the engine advances every matcher before it starts the fill and reads
`RequestGrammar.terminated`, a plain attribute, afterwards.
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
"""Longest wait for a fill to start or end (it takes milliseconds; longer means the worker is gone)."""


def default_threads() -> int:
    """Half the cores, at most 16: the step loop and the device's host work keep the rest."""
    return max(1, min(16, (os.cpu_count() or 2) // 2))


class BitmaskFill:
    """One step's fill: started on the worker (or run inline), read once with `result`."""

    def __init__(self, filler: BitmaskFiller, matchers: list, rows: list[int], num_rows: int) -> None:
        self.filler, self.matchers, self.rows, self.num_rows = filler, matchers, rows, num_rows
        self.started, self.done = threading.Event(), threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        self.started.set()
        try:
            self.filler.fill_rows(self.matchers, self.num_rows, self.rows)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the step loop's thread by result()
            self.error = exc
        self.done.set()

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Wait for the fill; the bitmask and the grammar rows, copied to the device."""
        if not self.done.wait(FILL_TIMEOUT_S):
            raise RuntimeError(f"the grammar bitmask fill did not end within {FILL_TIMEOUT_S} s")
        if self.error is not None:
            raise self.error
        return self.filler.to_device(self.num_rows, self.rows)


class BitmaskFiller:
    """Fills steps' bitmasks for one engine; `num_threads` is xgrammar's thread count per fill."""

    def __init__(self, vocab_size: int, device: torch.device, num_threads: int | None = None) -> None:
        self.width, self.device = bitmask_width(vocab_size), device
        self.num_threads = num_threads or default_threads()
        self._batch = xgr.BatchGrammarMatcher(self.num_threads)
        self._host = self._device_buf = torch.empty(0, dtype=torch.int32)
        self._copied: torch.cuda.Event | None = None
        self._jobs: queue.SimpleQueue[BitmaskFill | None] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._last: BitmaskFill | None = None

    def build(self, grammars: Sequence[RequestGrammar | None]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Fill on this thread and wait (synchronous steps); None when no row has a live grammar."""
        fill = self._prepare(grammars)
        if fill is None:
            return None
        fill.run()
        return fill.result()

    def start(self, grammars: Sequence[RequestGrammar | None]) -> BitmaskFill | None:
        """Start filling on the worker thread and return once it runs (None: no live grammar row)."""
        fill = self._prepare(grammars)
        if fill is None:
            return None
        if self._worker is None:
            self._worker = threading.Thread(target=self._serve, name="grammar-fill", daemon=True)
            self._worker.start()
        self._jobs.put(fill)
        self._last = fill
        # Block until the worker holds the job: a thread woken while this one runs Python waits for
        # the GIL up to the interpreter's switch interval (5 ms), longer than the whole fill.
        if not fill.started.wait(FILL_TIMEOUT_S):
            raise RuntimeError(f"the grammar bitmask fill did not start within {FILL_TIMEOUT_S} s")
        return fill

    def wait(self) -> None:
        """Wait for the last started fill to end (a failed step may have left one running)."""
        if self._last is not None:
            self._last.done.wait(FILL_TIMEOUT_S)

    def close(self) -> None:
        if self._worker is not None:
            self._jobs.put(None)

    def _serve(self) -> None:
        while (fill := self._jobs.get()) is not None:
            fill.run()

    def _prepare(self, grammars: Sequence[RequestGrammar | None]) -> BitmaskFill | None:
        rows = [i for i, g in enumerate(grammars) if g is not None and not g.terminated]
        if not rows:
            return None
        if self._copied is not None:  # the previous step's copy out of the host buffer has ended
            self._copied.synchronize()
        size = len(grammars) * self.width
        self._reserve(size + len(rows))
        self._host[size: size + len(rows)] = torch.tensor(rows, dtype=torch.int32)
        return BitmaskFill(self, [grammars[i].matcher for i in rows], rows, len(grammars))

    def fill_rows(self, matchers: list, num_rows: int, rows: list[int]) -> None:
        bitmask = self._host[: num_rows * self.width].view(num_rows, self.width)
        self._batch.batch_fill_next_token_bitmask(matchers, bitmask, rows)

    def to_device(self, num_rows: int, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Bitmask [N, W] and rows [k], after the mask in one buffer: one host -> device copy."""
        size = num_rows * self.width
        flat = self._host[: size + len(rows)]
        if self.device.type == "cuda":
            flat = self._device_buf[: flat.numel()].copy_(flat, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        return flat[:size].view(num_rows, self.width), flat[size:]

    def _reserve(self, numel: int) -> None:
        if self._host.numel() >= numel:
            return
        numel = max(numel, 2 * self._host.numel())
        pinned = self.device.type == "cuda"
        self._host = torch.empty(numel, dtype=torch.int32, pin_memory=pinned)
        if pinned:
            self._device_buf = torch.empty(numel, dtype=torch.int32, device=self.device)
