"""The engine behind an asyncio service: `EngineCore` stepping on its own thread.

The step loop stays synchronous and single-threaded (only its thread touches the block pool);
services talk to it with `await`:

    async for out in engine.generate(request_id, prompt_token_ids, params, ...):
        ...                     # EngineOutput deltas, the last one has finished=True

Commands (add, abort) cross to the engine thread through a queue; outputs cross back with
`loop.call_soon_threadsafe`. Leaving the `async for` early (client gone, task cancelled) aborts
the request, which frees its blocks.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, fields

from splitserve.shared.config import EngineConfig
from splitserve.shared.engine import EngineCore, EngineOutput, EngineStats, KvTransferParams
from splitserve.shared.request import SessionHint
from splitserve.shared.runner import SampledToken
from splitserve.shared.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

FirstToken = SampledToken


class EngineDeadError(RuntimeError):
    """The engine thread failed; the request cannot complete."""


class RequestFailedInEngine(RuntimeError):
    """A step failed on this request and aborted it; the engine goes on (EngineCore.step)."""


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    kv_transfer: KvTransferParams | None
    first_token: SampledToken | None
    session: SessionHint | None = None


@dataclass
class _Abort:
    request_id: str


class AsyncEngine:
    def __init__(self, config: EngineConfig, role: str = "colocated", connector_factory=None,
                 model_name: str | None = None, on_dead=None) -> None:
        """`on_dead(exc)` is called from the engine thread if it dies (a CUDA error, say), after every
        open stream has been given the error: the worker process exits so that it is restarted."""
        if role not in ("prefill", "decode", "colocated"):
            raise ValueError(f"role must be prefill, decode or colocated, got {role!r}")
        self.role = role
        self.core = EngineCore(config, connector_factory)
        from splitserve.shared.demo import served_model_name

        self.model_name = model_name or served_model_name(config.model.model)
        self.max_model_len = self.core.max_model_len
        self.block_size = self.core.block_size
        self.instance_id = getattr(self.core.connector, "instance_id", None) or f"{role}-{id(self):x}"
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stats = self.core.stats()
        self._stopped = False
        self._dead: BaseException | None = None
        self._on_dead = on_dead
        self._thread = threading.Thread(target=self._run, name=f"engine-{role}", daemon=True)
        self._thread.start()

    # ---- the asyncio side -------------------------------------------------------------

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                       priority: int = 0, hold_kv: bool = False, kv_handle=None,
                       first_token: SampledToken | None = None,
                       session: SessionHint | None = None) -> AsyncIterator[EngineOutput]:
        if self._dead is not None:
            raise EngineDeadError(f"engine stopped: {self._dead}")
        kv_transfer = KvTransferParams(hold=True) if hold_kv else (
            KvTransferParams(handle=kv_handle) if kv_handle is not None else None)
        out_queue: asyncio.Queue = asyncio.Queue()
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._queues[request_id] = (asyncio.get_running_loop(), out_queue)
        self._send(_Add(request_id, list(prompt_token_ids), params, priority, kv_transfer, first_token, session))
        finished = False
        try:
            while True:
                item = await out_queue.get()
                if isinstance(item, BaseException):
                    raise item
                # A consumer that fell behind the engine gets everything queued as one delta: one
                # gRPC message and one SSE event instead of one per token (vLLM merges likewise).
                error = None
                while not item.finished and not out_queue.empty():
                    following = out_queue.get_nowait()
                    if isinstance(following, BaseException):
                        error = following
                        break
                    _merge_into(item, following)
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
        """Thread-safe, idempotent: stop the request wherever it is and free its blocks."""
        self._send(_Abort(request_id))

    def load(self) -> EngineStats:
        return self._stats

    def shutdown(self, timeout_s: float = 5.0) -> None:
        self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout_s)
        self.core.close()

    def _send(self, command) -> None:
        self._commands.put(command)
        self._wakeup.set()

    def _deliver(self, request_id: str, item) -> None:
        target = self._queues.get(request_id)
        if target is not None:
            loop, out_queue = target
            loop.call_soon_threadsafe(out_queue.put_nowait, item)

    def _deliver_step(self, outputs: list[EngineOutput]) -> None:
        """A step's outputs, handed to each event loop in one call: waking a loop costs a syscall
        and a callback, so one per step rather than one per request."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, EngineOutput]]] = {}
        for out in outputs:
            target = self._queues.get(out.request_id)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], out))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)

    # ---- the engine thread ------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopped:
                self._drain_commands()
                if not self.core.has_unfinished_requests():
                    self._stats = self.core.stats()
                    self._wakeup.wait(0.05)
                    self._wakeup.clear()
                    continue
                outputs = self.core.step()
                self._deliver_step(outputs)
                self._stats = self.core.stats()
                if not outputs and not self.core.scheduler.running and not self.core.scheduler.waiting:
                    time.sleep(0.0005)  # only remote KV in flight: poll the connector again shortly
        except BaseException as exc:  # the engine is unusable: fail every request loudly
            logger.exception("engine thread died")
            self._dead = exc
            for request_id in list(self._queues):
                self._deliver(request_id, EngineDeadError(f"engine failed: {exc}"))
            if self._on_dead is not None:
                self._on_dead(exc)

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Abort):
                if self.core.abort_request(command.request_id):
                    # Someone still waiting on the stream (an Abort RPC, not the stream's own
                    # cancellation) must see it end rather than wait for tokens that never come.
                    self._deliver(command.request_id, EngineOutput(command.request_id, finished=True,
                                                                   finish_reason="abort"))
                continue
            try:
                self.core.add_request(command.request_id, command.prompt_token_ids, command.params,
                                      priority=command.priority, kv_transfer=command.kv_transfer,
                                      first_token=command.first_token, session=command.session)
            except ValueError as exc:
                self._deliver(command.request_id, exc)


def _put_all(items: list[tuple[asyncio.Queue, EngineOutput]]) -> None:
    for out_queue, item in items:
        out_queue.put_nowait(item)


def _merge_into(out: EngineOutput, following: EngineOutput) -> None:
    """Append `following` (a later delta of the same request) to `out`; its other fields (the
    final ones: finish reason, counts, KV handle) replace out's."""
    for f in fields(EngineOutput):
        if f.name.startswith("new_"):
            getattr(out, f.name).extend(getattr(following, f.name))
        elif f.name != "request_id":
            setattr(out, f.name, getattr(following, f.name))
