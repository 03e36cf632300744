"""The threads that compile grammars: each compile is timed from when a thread starts it, and one
that overruns is abandoned and its thread replaced, so one stuck compile never holds up the others.

    pool.submit(fn, *args) ─▶ Future: queued ─▶ running (a thread took it: `future.running()`)
                                                 ├─▶ done: fn's result, or its exception
                                                 └─▶ still running timeout_s after it started: the
                                                     future fails with CompileTimeout, the thread is
                                                     abandoned and a new one serves the queue

Neither xgrammar nor llguidance can stop a compile once begun, so an abandoned thread runs on
until its compile ends, then rejoins the pool if the pool is short of threads, or ends. What
bounds them: at most `max_abandoned` abandoned threads are replaced; past that the pool serves
with fewer threads until one comes back, so there are never more than num_threads +
max_abandoned. And the compiler caches the timed-out spec's failure (GrammarCompiler), so sending
the same spec again costs no thread. The gateway refuses the specs known to compile slowly
(RequestLimits: size and nesting depth) before they get here.

A watchdog thread sleeps until the earliest deadline of the running compiles; a queued compile
has no deadline here (how long a request may wait for its compile to start is GrammarWaitlist's).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

COMPILE_THREADS = 4
"""Threads that compile at once. Idle ones cost nothing; more than one, so that a slow compile
(a large schema takes seconds) holds up no other spec's."""

MAX_ABANDONED = 4
"""Abandoned compile threads (still running a compile past its timeout) that get a replacement."""


class CompileTimeout(TimeoutError):
    """A compile still ran `timeout_s` after it started (its wait in the queue not counted)."""


@dataclass
class _Job:
    fn: Callable[..., Any]
    args: tuple
    future: Future = field(default_factory=Future)
    deadline: float = 0.0
    """When it must have finished (set when a thread starts it)."""
    abandoned: bool = False


class CompilePool:
    def __init__(self, num_threads: int, timeout_s: float, max_abandoned: int = MAX_ABANDONED) -> None:
        self.num_threads, self.timeout_s, self.max_abandoned = num_threads, timeout_s, max_abandoned
        self._cond = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._running: list[_Job] = []
        self.num_serving = 0
        """Threads that take jobs from the queue (abandoned ones are not among them)."""
        self.num_abandoned = 0
        """Threads still running a compile that overran."""
        self._closed = False
        self._started = False

    def submit(self, fn, *args) -> Future:
        """A future of `fn(*args)`, run on a pool thread."""
        job = _Job(fn, args)
        with self._cond:
            if self._closed:
                raise RuntimeError("the compile pool is closed")
            if not self._started:  # threads start with the first compile: most engines never compile
                self._started = True
                for _ in range(self.num_threads):
                    self._start_thread()
                threading.Thread(target=self._watch, name="grammar-watchdog", daemon=True).start()
            self._queue.append(job)
            self._cond.notify_all()
        return job.future

    def close(self) -> None:
        """Cancel what is queued; the threads end once their compile does."""
        with self._cond:
            self._closed = True
            queued, self._queue = list(self._queue), deque()
            self._cond.notify_all()
        for job in queued:
            job.future.cancel()

    def _start_thread(self) -> None:
        self.num_serving += 1
        threading.Thread(target=self._serve, name="grammar", daemon=True).start()

    def _serve(self) -> None:
        while (job := self._take()) is not None:
            try:
                result, error = job.fn(*job.args), None
            except BaseException as exc:  # noqa: BLE001 - the future's to raise
                result, error = None, exc
            if self._settle(job):  # abandoned meanwhile: its future already failed
                if not self._rejoin():
                    return
            elif error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)

    def _take(self) -> _Job | None:
        """The next queued job, now running (None: the pool closed, this thread ends)."""
        with self._cond:
            while True:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    self.num_serving -= 1
                    return None
                job = self._queue.popleft()
                if job.future.set_running_or_notify_cancel():  # False: cancelled while queued
                    job.deadline = time.monotonic() + self.timeout_s
                    self._running.append(job)
                    self._cond.notify_all()  # the watchdog: a new deadline
                    return job

    def _settle(self, job: _Job) -> bool:
        """`job` ended on its thread; whether it had been abandoned (under the lock, so the
        watchdog and this thread agree on which of them settles its future)."""
        with self._cond:
            if job.abandoned:
                self.num_abandoned -= 1
                return True
            self._running.remove(job)
            return False

    def _rejoin(self) -> bool:
        """An abandoned thread is done: it serves again if the pool is short of threads."""
        with self._cond:
            if self._closed or self.num_serving >= self.num_threads:
                return False
            self.num_serving += 1
            return True

    def _watch(self) -> None:
        """Fail the compiles that overrun, abandon their threads, start replacements."""
        while True:
            with self._cond:
                if self._closed:
                    return
                now = time.monotonic()
                overdue = [job for job in self._running if job.deadline <= now]
                for job in overdue:
                    self._abandon(job)
                if not overdue:
                    self._cond.wait(min((job.deadline for job in self._running), default=now + 3600) - now)
            for job in overdue:  # outside the lock: the future's callbacks run here
                job.future.set_exception(CompileTimeout(f"still compiling {self.timeout_s:g} s after it began"))

    def _abandon(self, job: _Job) -> None:
        job.abandoned = True
        self._running.remove(job)
        self.num_serving -= 1
        self.num_abandoned += 1
        if self.num_abandoned <= self.max_abandoned:
            self._start_thread()
