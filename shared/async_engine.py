"""The engine behind an asyncio service: `EngineCore` in a process of its own, awaited from here.

    async for out in engine.generate(request_id, prompt_token_ids, params, ...):
        ...                     # EngineOutput deltas, the last one has finished=True

The engine runs its step loop in a child process (shared/engine_process.py), so that loop never
waits for this process's interpreter lock: gRPC serving and protobuf work stay here. Commands go
to the engine over a ZeroMQ PUSH socket; one receiver thread reads the engine's messages (one per
step, all requests) and hands each event loop its share in one callback. Leaving the `async for`
early (client gone, task cancelled) aborts the request, which frees its blocks.

Lifecycle of the engine process, from this side:

    AsyncEngine(...) ─▶ spawn ─▶ EngineReady (start-up errors raise EngineStartupError here)
    serving ─▶ shutdown(): Shutdown command, bounded join, then terminate / kill
    the process dies or its loop fails ─▶ every open stream gets EngineDeadError, then on_dead(exc)
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import AsyncIterator

import zmq

from splitserve.shared.config import EngineConfig
from splitserve.shared.engine_output import EngineOutput, EngineStats, RequestError, SampledToken
from splitserve.shared.engine_protocol import (AbortRequest, AbortResult, AddRequest, EngineFailed, EngineReady,
                                               EngineStartFailed, EngineStep, Shutdown, encoder, event_decoder)
from splitserve.shared.request import SessionHint
from splitserve.shared.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

FirstToken = SampledToken
STARTUP_TIMEOUT_S = 900.0
"""Loading a large checkpoint and capturing CUDA graphs takes minutes; a hang still ends."""
STOP_TIMEOUT_S = 5.0
"""Within the launcher's own 10 s for the whole worker: its gRPC grace (2 s), this, the terminate."""
ABORT_REPLY_TIMEOUT_S = 10.0
RECEIVE_POLL_MS = 1000


class EngineDeadError(RuntimeError):
    """The engine process failed or exited; the request cannot complete."""


class RequestFailedInEngine(RuntimeError):
    """A step failed on this request and aborted it; the engine goes on (EngineCore.step)."""


class EngineBusyError(RuntimeError):
    """The engine could not take this request in time (its grammar's compile waited behind other
    compiles: GrammarWaitlist); sent again, it may succeed."""


_REJECTIONS = {"abort": RequestError, "busy": EngineBusyError}
"""What `generate` raises for a request the engine ended with an error and this finish reason
(Emitter.reject); 'error', a failed step, is RequestFailedInEngine."""


class EngineStartupError(RuntimeError):
    """The engine process could not start (a bad checkpoint, say); the message says why."""


class AsyncEngine:
    def __init__(self, config: EngineConfig, role: str = "colocated", connector_factory=None,
                 model_name: str | None = None, on_dead=None, startup_timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        """`connector_factory` must pickle (it is called in the engine process). `on_dead(exc)` is
        called from the receiver thread if the engine dies, after every open stream got the error:
        the worker process exits so that it is restarted."""
        if role not in ("prefill", "decode", "colocated"):
            raise ValueError(f"role must be prefill, decode or colocated, got {role!r}")
        from splitserve.shared.demo import served_model_name

        self.role = role
        self.model_name = model_name or served_model_name(config.model.model)
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, _Outputs]] = {}
        self._abort_replies: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._reply_ids = itertools.count()
        self.failure: BaseException | None = None
        """Why the engine is gone (None while it serves)."""
        self.counters: dict[str, int] = {}
        """The KV connector's counters, as of the engine's last message."""
        self.connector_failure: str | None = None
        """Why the KV connector's transfer plane died (None while it works), as the engine reported."""
        self._on_dead = on_dead
        self._stopping = False
        self._send_lock = threading.Lock()
        self._socket_dir = tempfile.mkdtemp(prefix="splitserve-engine-")
        self._zmq = zmq.Context()
        self._commands = self._bind(zmq.PUSH, "commands")
        self._events = self._bind(zmq.PULL, "events")
        self.process = self._spawn(config, connector_factory)
        try:
            ready = self._wait_ready(startup_timeout_s)
        except BaseException:
            self._stop_process()
            self._close_sockets()
            raise
        self.instance_id, self.max_model_len, self.block_size = ready.instance_id, ready.max_model_len, ready.block_size
        self.torch_threads = ready.torch_threads
        """The engine process's torch thread count (`ParallelConfig.cpu_threads`)."""
        self._stats: EngineStats = ready.stats
        self._receiver = threading.Thread(target=self._receive, name=f"engine-{role}-receiver", daemon=True)
        self._receiver.start()

    # ---- the asyncio side -------------------------------------------------------------

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                       priority: int = 0, hold_kv: bool = False, kv_handle=None,
                       first_token: SampledToken | None = None,
                       session: SessionHint | None = None) -> AsyncIterator[EngineOutput]:
        if self.failure is not None:
            raise EngineDeadError(f"engine stopped: {self.failure}")
        if request_id in self._queues:
            raise RequestError(f"request id {request_id!r} is already in use")
        out_queue = _Outputs()
        self._queues[request_id] = (asyncio.get_running_loop(), out_queue)
        self._send(AddRequest(request_id, list(prompt_token_ids), params, priority, hold_kv, kv_handle, first_token,
                               session))
        finished = False
        try:
            while True:
                item, *following = await out_queue.take()
                if isinstance(item, BaseException):
                    raise item
                item, error = _merge_queued(item, following)
                if item.error is not None:
                    raise RequestFailedInEngine(item.error)
                finished = item.finished
                yield item
                if finished:
                    return
                if error is not None:
                    raise error
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Idempotent, fire and forget: stop the request wherever it is and free its blocks."""
        self._send(AbortRequest(request_id))

    async def abort_request(self, request_id: str) -> bool:
        """Abort, and answer whether the engine knew the request (running, waiting or holding KV)."""
        if self.failure is not None:
            return False
        reply_id = next(self._reply_ids)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._abort_replies[reply_id] = (loop, future)
        self._send(AbortRequest(request_id, reply_id))
        try:
            return await asyncio.wait_for(future, ABORT_REPLY_TIMEOUT_S)
        except asyncio.TimeoutError:
            logger.warning("the engine did not answer the abort of %s within %.0f s", request_id, ABORT_REPLY_TIMEOUT_S)
            return False
        finally:
            self._abort_replies.pop(reply_id, None)

    def load(self) -> EngineStats:
        """The engine's stats after its last step."""
        return self._stats

    def shutdown(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop the engine process (bounded) and close the sockets; idempotent."""
        if self._stopping:
            return
        self._stopping = True
        self._send(Shutdown())
        self._stop_process(timeout_s)
        self._receiver.join(timeout_s)
        self._close_sockets()

    # ---- start and stop ---------------------------------------------------------------

    def _bind(self, kind: int, name: str) -> zmq.Socket:
        sock = self._zmq.socket(kind)
        sock.setsockopt(zmq.SNDHWM, 0)  # never drop or block: the engine's pace is the limit
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.bind(f"ipc://{self._socket_dir}/{name}")
        return sock

    def _spawn(self, config: EngineConfig, connector_factory) -> multiprocessing.Process:
        # spawn, not fork: CUDA cannot be used in a forked child, and a fresh interpreter holds
        # none of this process's threads or locks.
        context = multiprocessing.get_context("spawn")
        from splitserve.shared.engine_entry import run_engine_process  # imports torch in the child only

        process = context.Process(target=run_engine_process, name=f"splitserve-engine-{self.role}", args=(
            config, self.role, connector_factory, f"ipc://{self._socket_dir}/commands",
            f"ipc://{self._socket_dir}/events", os.getpid(), logging.getLogger().getEffectiveLevel()))
        # The child ignores SIGINT once it runs; blocked until then, a Ctrl-C during its imports
        # does not kill it either (the signal mask is inherited across exec).
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        return process

    def _wait_ready(self, timeout_s: float) -> EngineReady:
        poller = zmq.Poller()
        poller.register(self._events, zmq.POLLIN)
        poller.register(self.process.sentinel, zmq.POLLIN)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ready = dict(poller.poll(RECEIVE_POLL_MS))
            if self._events in ready:
                event = event_decoder.decode(self._events.recv())
                if isinstance(event, EngineStartFailed):
                    raise EngineStartupError(f"the engine could not start: {event.error}")
                return event
            if self.process.sentinel in ready:
                self.process.join(5)
                raise EngineStartupError(f"the engine process exited with code {self.process.exitcode} during start-up")
        raise EngineStartupError(f"the engine did not start within {timeout_s:.0f} s")

    def _stop_process(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        self.process.join(timeout_s)
        for stop in (self.process.terminate, self.process.kill):
            if not self.process.is_alive():
                return
            logger.warning("the engine process did not stop in time; %s", stop.__name__)
            stop()
            self.process.join(2)

    def _close_sockets(self) -> None:
        with self._send_lock:
            self._commands.close(linger=0)
            self._events.close(linger=0)
            self._zmq.term()
        shutil.rmtree(self._socket_dir, ignore_errors=True)

    def _send(self, command) -> None:
        with self._send_lock:
            if self._commands.closed:
                return
            try:
                self._commands.send(encoder.encode(command), zmq.NOBLOCK)
            except zmq.Again:  # no engine connected: it is gone, and the receiver reports that
                pass

    # ---- the receiver thread ----------------------------------------------------------

    def _receive(self) -> None:
        poller = zmq.Poller()
        poller.register(self._events, zmq.POLLIN)
        poller.register(self.process.sentinel, zmq.POLLIN)
        while True:
            ready = dict(poller.poll(RECEIVE_POLL_MS))
            if self._events in ready:
                self._handle(event_decoder.decode(self._events.recv(copy=False).buffer))
                continue  # read everything the engine sent before looking at its exit
            if self.process.sentinel in ready:
                if not self._stopping:
                    self.process.join(5)
                    self._fail(EngineDeadError(f"engine failed: its process exited with code {self.process.exitcode}"))
                return

    def _handle(self, event) -> None:
        if isinstance(event, EngineStep):
            self._stats = event.stats  # before the outputs: a stream that ended sees its blocks freed
            self.counters = event.counters
            self.connector_failure = event.connector_failure
            self._deliver_step(event.outputs, event.rejected)
        elif isinstance(event, AbortResult):
            target = self._abort_replies.get(event.reply_id)
            if target is not None:
                _call_in(target[0], _set_result, target[1], event.found)
        elif isinstance(event, EngineFailed):
            self._fail(EngineDeadError(f"engine failed: {event.error}"))

    def _deliver_step(self, outputs: list[EngineOutput], rejected: list[tuple[str, str]]) -> None:
        """A step's outputs, handed to each event loop in one call: waking a loop costs a syscall
        and a callback, so one per step rather than one per request."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Outputs, object]]] = {}
        for request_id, item in [*((o.request_id, o) for o in outputs),
                                 *((rid, RequestError(why)) for rid, why in rejected)]:
            target = self._queues.get(request_id)
            if target is not None:
                # finish_reason 'abort' with an error: the request as given cannot run (its grammar
                # does not compile), raised as RequestError; 'busy' as EngineBusyError; 'error' (a
                # failed step) is raised in generate.
                if isinstance(item, EngineOutput) and item.error is not None and item.finish_reason in _REJECTIONS:
                    item = _REJECTIONS[item.finish_reason](item.error)
                by_loop.setdefault(target[0], []).append((target[1], item))
        for loop, items in by_loop.items():
            _call_in(loop, _put_all, items)

    def _fail(self, exc: EngineDeadError) -> None:
        if self.failure is not None:
            return
        logger.error("%s", exc)
        self.failure = exc
        for loop, out_queue in list(self._queues.values()):
            _call_in(loop, out_queue.put_nowait, exc)
        for loop, future in list(self._abort_replies.values()):
            _call_in(loop, _set_result, future, False)
        if self._on_dead is not None:
            self._on_dead(exc)


def _call_in(loop: asyncio.AbstractEventLoop, callback, *args) -> None:
    """Run `callback(*args)` on `loop`; a loop that has closed (its caller left) gets nothing."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        pass


def _put_all(items: list[tuple[_Outputs, object]]) -> None:
    for out_queue, item in items:
        out_queue.put_nowait(item)


def _set_result(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


class _Outputs:
    """One request's outputs (or the error that ends it) waiting for its stream: a list and at
    most one waiter, filled on the event loop's thread. It replaced an asyncio.Queue, whose put and
    get machinery ran for every request every step and was a third of the serving process's
    cost per token."""

    __slots__ = ("items", "waiter")

    def __init__(self) -> None:
        self.items: list = []
        self.waiter: asyncio.Future | None = None

    def put_nowait(self, item) -> None:
        self.items.append(item)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def take(self) -> list:
        """Everything that arrived, oldest first (waits for at least one item)."""
        while not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        items, self.items = self.items, []
        return items


def _merge_queued(item: EngineOutput, following: list) -> tuple[EngineOutput, BaseException | None]:
    """A consumer that fell behind the engine gets everything queued as one delta: one gRPC
    message and one SSE event instead of one per token (vLLM merges likewise). Returns the merged
    output and an error queued behind it, if any."""
    for later in following:
        if item.finished:
            break
        if isinstance(later, BaseException):
            return item, later
        _merge_into(item, later)
    return item, None


def _merge_into(out: EngineOutput, following: EngineOutput) -> None:
    """Append `following` (a later delta of the same request) to `out`; its other fields (the
    final ones: finish reason, counts, KV handle) replace out's."""
    for name in EngineOutput.__struct_fields__:
        if name.startswith("new_"):
            getattr(out, name).extend(getattr(following, name))
        elif name != "request_id":
            setattr(out, name, getattr(following, name))
