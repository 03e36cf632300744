"""A step's grammar bitmask, on a pool of our own threads beside the step loop: accept, then fill.

    fill = filler.start(new_tokens, grammars)   splits the step into slices, one a pool thread,
                                                and returns once every thread has taken its own
    ... the step loop books what of the previous step needs no grammar ...
    fill.wait_accepted()                        the matchers took the previous step's tokens:
                                                `terminated` and rejections are known
    ... the step loop books the grammar rows' outputs, the rows fill meanwhile ...
    fill.result()  ─▶ (bitmask [N, ceil(V/32)] int32, grammar rows [k] int32) on the device, or None

Each of the K pool threads (`--structured-outputs-threads`) owns a contiguous slice of the step's
grammar rows, balanced by row count, and makes two xgrammar calls for it, each with the GIL
released: the batched accept of its rows' new tokens (a sequential C++ loop, a few µs a token),
then the fill of its rows with a BatchGrammarMatcher(1) of its own (tens of µs a row of a 128k
vocabulary) into the shared host bitmask at the rows' indices. A grammar's accept and fill are in
the same slice, so the threads never wait for each other.

The pool threads run no Python beyond those two calls and setting Events: a thread that wants the
GIL while the step loop runs Python waits for it up to the switch interval (5 ms), longer than
its work. So the step loop builds every list in `start` (matcher handles, tokens, row indices a
slice), and reads the accept results (keeping each grammar's `terminated`) in `wait_accepted`.
The threads take the GIL only where the step loop waits holding none: `start` returns once every
thread has taken its slice (the handshake), a thread passes from its accept to its fill while
the step loop waits in `wait_accepted`, and reports its fill while it waits in `result`
(docs/benchmarks.md, section 15).

Which rows fill is decided in `start`, before the accepts: those whose grammar is live and whose
new token is none of its stop tokens (an accepted stop token terminates the grammar, and xgrammar
refuses to fill a terminated one). Two cases are settled on the step loop: a grammar without stop
tokens (ignore_eos) ends when complete, which only its matcher knows, so `wait_accepted` reads it
once its slice's fill is done; a stop token the grammar refused (a masking bug) leaves its row
live but unfilled, so `result` fills that row on the step loop's thread.

The rows are written into one reused (pinned, on CUDA) host buffer, bitmask and row indices side
by side, which reaches the device in one copy; rows without a live grammar are neither filled nor
listed, so the mask kernel leaves their logits alone. Between `start` and `result` the caller must
not touch a matcher, and must not read `RequestGrammar.terminated` before `wait_accepted`. A
grammar may appear once a step (one row a request).
"""

from __future__ import annotations

import operator
import os
import queue
import threading
from collections.abc import Sequence

import torch
import xgrammar as xgr
from xgrammar.base import _core

from splitserve.shared.grammar import RequestGrammar, bitmask_width

FILL_TIMEOUT_S = 60.0
"""Longest wait for a pool thread (its work takes milliseconds; longer means it is gone)."""

_ACCEPT = _core.BatchGrammarMatcher.batch_accept_token
"""xgrammar's batched accept below its Python wrapper, which would build the handle list and read
the result array on the pool thread: here the step loop does both (`start`, `wait_accepted`)."""


def default_threads() -> int:
    """Half the cores this process may run on, at most 4: the step loop and the device's host
    work keep the rest. On a 16-core H200 host 4 threads lost 19-21 % of the unconstrained
    throughput where 8 lost 25-35 % (docs/benchmarks.md section 19): each thread's wake and
    hand-back is the step loop's work, and 256 rows fill in time on 4."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    return max(1, min(4, cores // 2))


class _Slice:
    """One pool thread's part of a step: accept `tokens` into `accept_handles`, then fill `fill_rows`
    of `bitmask` from `fill_handles`. Built by the step loop; the thread only reads it and sets
    `accepted`, `error` and the events."""

    def __init__(self, bitmask: torch.Tensor) -> None:
        self.bitmask = bitmask
        self.token_positions: list[int] = []
        """Where each of `tokens` is in the step's new tokens."""
        self.accept_handles: list = []
        self.tokens: list[int] = []
        self.fill_handles: list = []
        self.fill_rows: list[int] = []
        self.ends_unseen = False
        """A grammar without stop tokens takes a token and fills here: its `terminated` is read after the fill."""
        self.accepted: Sequence[bool] = ()
        self.error: BaseException | None = None
        self.taken, self.accept_done, self.done = threading.Event(), threading.Event(), threading.Event()


def plan_slices(new_tokens: Sequence[tuple[RequestGrammar, int]], grammars: Sequence[RequestGrammar | None],
                num_slices: int, bitmask: torch.Tensor) -> tuple[list[_Slice], set[int]]:
    """The step's non-empty slices and the rows they fill: the live rows, taking no stop token,
    in `num_slices` contiguous runs of equal length; a token whose grammar fills nowhere is
    accepted in the slices in turn."""
    stopping = {id(g) for g, token_id in new_tokens if token_id in g.stop_token_ids}
    rows = [i for i, g in enumerate(grammars) if g is not None and not g.terminated and id(g) not in stopping]
    slices, owner = [_Slice(bitmask) for _ in range(num_slices)], {}
    for n, row in enumerate(rows):
        grammar = grammars[row]
        part = slices[owner.setdefault(id(grammar), n * num_slices // len(rows))]
        part.fill_handles.append(grammar.handle)
        part.fill_rows.append(row)
    for n, (grammar, token_id) in enumerate(new_tokens):
        part = slices[owner.get(id(grammar), n % num_slices)]
        part.token_positions.append(n)
        part.accept_handles.append(grammar.handle)
        part.tokens.append(token_id)
        part.ends_unseen |= not grammar.stop_token_ids and id(grammar) in owner
    return [s for s in slices if s.tokens or s.fill_rows], set(rows)


class StepPlan:
    """A step's slices, reused while the steps repeat: the same grammars accepting (in order), the
    same grammars filling, each as live, and no stop token among the new tokens. A steady decode
    batch repeats every step, so its per-row planning (a few µs a row on the step loop, which the
    device waits for) is done once; a step is then its tokens, gathered per slice in one call each.
    A step that misses builds a new plan."""

    def __init__(self, accepting: list, grammars: list, live: tuple[bool, ...], slices: list[_Slice],
                 rows: set[int]) -> None:
        self.accepting, self.grammars, self.live, self.templates = accepting, grammars, live, slices
        self.rows = sorted(rows)
        self.rows_set = rows
        self.rows_tensor = torch.tensor(self.rows, dtype=torch.int32)
        self.stop_token_ids = frozenset().union(*{id(g): g.stop_token_ids for g in accepting}.values())
        self.ends_unseen = any(part.ends_unseen for part in slices)

    def fits(self, accepting: list, grammars: list, live: tuple[bool, ...], tokens: Sequence[int]) -> bool:
        """This step repeats the plan's (identity, not equality: a grammar is its matcher)."""
        return (len(accepting) == len(self.accepting) and len(grammars) == len(self.grammars)
                and live == self.live and all(map(operator.is_, accepting, self.accepting))
                and all(map(operator.is_, grammars, self.grammars)) and self.stop_token_ids.isdisjoint(tokens))

    def slices(self, tokens: Sequence[int], bitmask: torch.Tensor) -> list[_Slice]:
        """Fresh slices of the plan holding this step's tokens."""
        parts = []
        for template in self.templates:
            part = _Slice(bitmask)
            part.token_positions, part.accept_handles = template.token_positions, template.accept_handles
            part.fill_handles, part.fill_rows = template.fill_handles, template.fill_rows
            part.ends_unseen = template.ends_unseen
            part.tokens = list(map(tokens.__getitem__, part.token_positions))
            parts.append(part)
        return parts


class StepFill:
    """One step's accept and fill on the pool (`plan`: a step of a StepPlan, holding no stop token)."""

    def __init__(self, filler: BitmaskFiller, new_tokens: Sequence[tuple[RequestGrammar, int]],
                 grammars: Sequence[RequestGrammar | None], slices: list[_Slice], filled: set[int],
                 plan: StepPlan | None = None) -> None:
        self.filler, self.new_tokens, self.grammars = filler, new_tokens, grammars
        self.slices, self.filled, self.plan = slices, filled, plan
        self._accepted: list[bool] | None = None

    def wait_accepted(self) -> list[bool]:
        """Wait for the accepts: whether each new token was accepted by its grammar (False: a
        masking bug, not input). Every `terminated` holds once this returns."""
        if self._accepted is None:
            for part in self.slices:
                _wait(part.accept_done, "accept")
                if part.error is not None:
                    raise part.error
            self._accepted = self._note_accepted()
        return self._accepted

    def result(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Wait for the fill; the bitmask and its grammar rows on the device (None: no live row)."""
        self.wait_accepted()
        for part in self.slices:
            _wait(part.done, "fill")
            if part.error is not None:
                raise part.error
        plan = self.plan
        if plan is not None and not plan.ends_unseen:  # no stop token, no completion: as planned
            return self.filler.to_device(len(self.grammars), plan.rows, plan.rows_tensor) if plan.rows else None
        rows = live_rows(self.grammars)
        missed = [i for i in rows if i not in self.filled]  # a refused stop token: still live
        if missed:
            self.filler.fill_inline(self.grammars, missed)
        return self.filler.to_device(len(self.grammars), rows) if rows else None

    def _note_accepted(self) -> list[bool]:
        """Each grammar's `terminated` after its token; whether each token was taken. A planned
        slice whose tokens were all taken changes no `terminated` (no stop token, none ends
        unseen): nothing to read there, row by row."""
        accepted = [True] * len(self.new_tokens)
        for part in self.slices:
            if part.ends_unseen:  # is_terminated() must not race the fill of the same matcher
                _wait(part.done, "fill")
            elif self.plan is not None and 0 not in part.accepted:
                continue
            for position, ok in zip(part.token_positions, part.accepted):
                grammar, token_id = self.new_tokens[position]
                accepted[position] = ok = bool(ok)
                grammar.note_accepted(token_id, ok)
        return accepted


class BitmaskFiller:
    """Fills steps' bitmasks for one engine over a pool of `num_threads` threads of its own."""

    def __init__(self, vocab_size: int, device: torch.device, num_threads: int | None = None) -> None:
        self.width, self.device = bitmask_width(vocab_size), device
        self.num_threads = default_threads() if num_threads is None else num_threads
        """The pool's threads, each filling one slice of a step's rows."""
        self.num_slices = self.num_threads
        """The slices a step's rows are cut into (one a pool thread)."""
        self._inline = xgr.BatchGrammarMatcher(1)  # the step loop's own fills (result's refused stop tokens)
        self._host = self._device_buf = torch.empty(0, dtype=torch.int32)
        self._copied: torch.cuda.Event | None = None
        self._pool: list[_PoolThread] = []
        self._last: list[_Slice] = []
        self._plan: StepPlan | None = None

    def build(self, grammars: Sequence[RequestGrammar | None]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Fill on the pool and wait (synchronous steps); None when no row has a live grammar."""
        return self.start((), grammars).result()

    def start(self, new_tokens: Sequence[tuple[RequestGrammar, int]],
              grammars: Sequence[RequestGrammar | None]) -> StepFill:
        """Hand the pool this step: accept each (grammar, token) of `new_tokens`, then fill the
        rows of `grammars` still live. Returns once every thread has taken its slice; until
        `wait_accepted` returns, no `terminated` may be read, and until `result`, no matcher touched."""
        self.wait()
        new_tokens, grammars = list(new_tokens), list(grammars)
        self._reserve(len(grammars))
        bitmask = self.host_bitmask(len(grammars))
        accepting, tokens = (list(column) for column in zip(*new_tokens)) if new_tokens else ([], [])
        live = tuple([g is not None and not g.terminated for g in grammars])
        plan = self._plan
        if plan is not None and plan.fits(accepting, grammars, live, tokens):
            slices, filled = plan.slices(tokens, bitmask), plan.rows_set
        else:
            slices, filled = plan_slices(new_tokens, grammars, self.num_slices, bitmask)
            plan = StepPlan(accepting, grammars, live, slices, filled)
            plan = self._plan = plan if plan.stop_token_ids.isdisjoint(tokens) else None
        for thread, part in zip(self._running_pool() if slices else [], slices):
            thread.jobs.put(part)
        for part in slices:  # the handshake: each thread runs before the step loop goes on
            _wait(part.taken, "take its slice")
        self._last = slices
        return StepFill(self, new_tokens, grammars, slices, filled, plan)

    def wait(self) -> None:
        """Wait for the last started step's slices to end (a failed step may have left them running)."""
        if all(part.done.wait(FILL_TIMEOUT_S) for part in self._last):
            self._last = []

    def close(self) -> None:
        """Stop the pool (each thread ends the slice it holds first); a later start starts a new one."""
        pool, self._pool = self._pool, []
        for thread in pool:
            thread.jobs.put(None)
        for thread in pool:
            thread.join()

    def accept(self, new_tokens: Sequence[tuple[RequestGrammar, int]]) -> list[bool]:
        """Synchronous steps: advance each grammar by its token on this thread; whether each took it."""
        return accept_tokens(new_tokens)

    def fill_inline(self, grammars: Sequence[RequestGrammar | None], rows: list[int]) -> None:
        self._inline.batch_fill_next_token_bitmask([grammars[i].matcher for i in rows],
                                                   self.host_bitmask(len(grammars)), rows)

    def _running_pool(self) -> list[_PoolThread]:
        if not self._pool:
            self._pool = [_PoolThread(i) for i in range(self.num_threads)]
        return self._pool

    def host_bitmask(self, num_rows: int) -> torch.Tensor:
        return self._host[: num_rows * self.width].view(num_rows, self.width)

    def to_device(self, num_rows: int, rows: list[int], rows_tensor: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bitmask [N, W] and rows [k] (`rows_tensor`: the same as int32, if at hand), the rows after
        the mask in one buffer: one host -> device copy."""
        size = num_rows * self.width
        self._host[size: size + len(rows)] = torch.tensor(rows, dtype=torch.int32) if rows_tensor is None else rows_tensor
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


def make_filler(backend: str, vocab_size: int, device: torch.device, num_threads: int | None = None) -> BitmaskFiller:
    """The bitmask filler of `--structured-outputs-backend` (config.STRUCTURED_OUTPUTS_BACKENDS)."""
    if backend == "guidance":
        from splitserve.shared.grammar_guidance import GuidanceFiller

        return GuidanceFiller(vocab_size, device, num_threads)
    return BitmaskFiller(vocab_size, device, num_threads)


def live_rows(grammars: Sequence[RequestGrammar | None]) -> list[int]:
    return [i for i, g in enumerate(grammars) if g is not None and not g.terminated]


def accept_tokens(new_tokens: Sequence[tuple[RequestGrammar, int]]) -> list[bool]:
    """Advance each grammar by its token in one batched call on this thread (synchronous steps);
    whether each took it."""
    if not new_tokens:
        return []
    results = xgr.BatchGrammarMatcher.batch_accept_token([g.matcher for g, _ in new_tokens],
                                                         [t for _, t in new_tokens])
    for (grammar, token_id), accepted in zip(new_tokens, results):
        grammar.note_accepted(token_id, accepted)
    return results


def _wait(event: threading.Event, what: str) -> None:
    if not event.wait(FILL_TIMEOUT_S):
        raise RuntimeError(f"a structured-output pool thread did not {what} within {FILL_TIMEOUT_S} s")


def accept_slice(part: _Slice) -> None:
    """The slice's batched accept (GIL released inside); the result array is read by the step loop."""
    try:
        if part.tokens:
            part.accepted = _ACCEPT(part.accept_handles, part.tokens, False)
    except BaseException as exc:  # noqa: BLE001 - raised again on the step loop's thread
        part.error = exc


def fill_slice(part: _Slice, fill) -> None:
    """The slice's fill with its thread's own BatchGrammarMatcher(1) (GIL released inside)."""
    try:
        if part.error is None and part.fill_rows:
            fill(part.fill_handles, part.bitmask, part.fill_rows, False)
    except BaseException as exc:  # noqa: BLE001
        part.error = exc


class _PoolThread:
    """One thread of the pool: takes a slice, accepts its tokens, fills its rows."""

    def __init__(self, index: int) -> None:
        self.jobs: queue.SimpleQueue[_Slice | None] = queue.SimpleQueue()
        self._batch = xgr.BatchGrammarMatcher(1)
        self._thread = threading.Thread(target=self._serve, name=f"grammar-fill-{index}", daemon=True)
        self._thread.start()

    def join(self) -> None:
        self._thread.join(FILL_TIMEOUT_S)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _serve(self) -> None:
        fill = self._batch._handle.batch_fill_next_token_bitmask  # below the wrapper, as _ACCEPT
        while (part := self.jobs.get()) is not None:
            part.taken.set()
            accept_slice(part)
            part.accept_done.set()  # the step loop books while the rows fill
            fill_slice(part, fill)
            part.done.set()
