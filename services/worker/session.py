"""The worker side of a `Session`: many Generate requests multiplexed on one gRPC stream.

    commands (client -> worker)     generate | abort | credit
    outputs  (worker -> client)     SessionOutput: every chunk produced since the previous message

Each generate runs as its own task over the same per-request stream that the `Generate` RPC
serves (`open_stream`), so both APIs share one code path. The tasks put their chunks in an outbox
keyed by request id; one sender drains it. An engine step hands its outputs to the event loop in
one callback, so every task of a step runs before the sender does: one message per step, whatever
the batch size.

Flow control is by credit: a client that sends `credit` n may receive n more messages. While the
sender has no credit (or gRPC's own flow control holds it back), the later chunks of a request
are merged into the one already waiting. A client that processes slower than the engine steps
(the gateway at a few hundred streams) thus gets fewer, larger chunks instead of a growing
backlog, and its cost per token falls as its load rises. gRPC's window alone would not do this:
it admits megabytes of small messages before it pushes back. A client that never sends credit is
not limited.

The merging is bounded (`SessionConfig`): a chunk held `max_hold_ms` since the outbox filled, or
one that gathered `max_merged_tokens`, is sent ahead of credit, so a gateway that is only slow to
grant credit cannot stretch the inter-token latency past the bound. Such a message borrows the
credit the client will grant for it, and only one message is ever borrowed: a gateway that takes
longer than the bound to handle a message (hundreds of streams on one process) then gets the
merged chunks it can keep up with, not a backlog. (When sends ahead of credit used none, every one
of them widened the window for good, and at full load the gateway fell behind the engine by most
of a second by the end of a run.)

A request that fails ends with a chunk carrying `error` (the status its Generate call would have
ended with); the session goes on. An abort command, the client ending the call, or the call
failing cancels the request's task, which aborts it in the engine and frees its blocks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import grpc

from splitserve.services.worker.config import SessionConfig
from splitserve.shared.protocol import worker_pb2 as pb

logger = logging.getLogger(__name__)

MESSAGE_SOFT_LIMIT_BYTES = 8 * 1024 * 1024
"""A session message stays well under the channels' 64 MiB limit (shared/grpc_channel.py)."""
OpenStream = Callable[[pb.GenerateRequest], AsyncIterator[pb.GenerateChunk]]


class RequestFailed(Exception):
    """One request cannot go on: its stream ends with this gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


async def serve_session(commands: AsyncIterator[pb.SessionCommand], open_stream: OpenStream,
                        config: SessionConfig = SessionConfig()) -> AsyncIterator[pb.SessionOutput]:
    session = _Session(open_stream, config)
    async for output in session.run(commands):
        yield output


class _Session:
    def __init__(self, open_stream: OpenStream, config: SessionConfig) -> None:
        self.open_stream = open_stream
        self.config = config
        self.held_since: float | None = None  # loop time the outbox last went from empty to not
        self.overfull = False  # a waiting chunk reached max_merged_tokens
        self.hold_timer: asyncio.TimerHandle | None = None
        self.outbox: dict[str, pb.GenerateChunk] = {}
        self.wakeup = asyncio.Event()
        self.tasks: dict[str, asyncio.Task] = {}
        self.credit: int | None = None  # messages the client still accepts; None: it does not count

    async def run(self, commands: AsyncIterator[pb.SessionCommand]) -> AsyncIterator[pb.SessionOutput]:
        reader = asyncio.create_task(self._read(commands))
        reader.add_done_callback(lambda _: self.wakeup.set())
        try:
            while True:
                await self.wakeup.wait()
                self.wakeup.clear()
                if self.outbox and self._may_send():
                    for message in split_output(self._take_outbox()):
                        if self.credit is not None:
                            self.credit -= 1  # below zero: borrowed, repaid by the client's next grant
                        yield message
                    continue  # more may have arrived while the message was written
                if self.outbox and self.credit == 0:  # below zero only the client's grant can help
                    self._arm_hold_timer()
                if reader.done() and not self.tasks:
                    reader.result()  # a failed command stream fails the call
                    return
        finally:
            if self.hold_timer is not None:
                self.hold_timer.cancel()
            reader.cancel()
            for task in self.tasks.values():
                task.cancel()
            await asyncio.gather(reader, *self.tasks.values(), return_exceptions=True)

    async def _read(self, commands: AsyncIterator[pb.SessionCommand]) -> None:
        """Start and abort requests as commands arrive; returns when the client half-closes."""
        async for command in commands:
            which = command.WhichOneof("command")
            if which == "generate":
                request = command.generate
                if request.request_id in self.tasks:
                    self._emit(_error_chunk(request.request_id, grpc.StatusCode.ALREADY_EXISTS,
                                            f"request id {request.request_id!r} is already open on this session"))
                    continue
                task = asyncio.create_task(self._serve(request))
                self.tasks[request.request_id] = task
            elif which == "credit":
                self.credit = (self.credit or 0) + command.credit
                self.wakeup.set()
            elif which == "abort":
                task = self.tasks.pop(command.abort.request_id, None)
                if task is not None:
                    task.cancel()
                    self.outbox.pop(command.abort.request_id, None)  # the client stopped listening

    async def _serve(self, request: pb.GenerateRequest) -> None:
        request_id = request.request_id
        finished = False
        try:
            async for chunk in self.open_stream(request):
                finished = chunk.HasField("finish_reason")
                self._emit(chunk)
            if not finished:
                self._emit(_error_chunk(request_id, grpc.StatusCode.INTERNAL, "the request's stream ended early"))
        except RequestFailed as exc:
            self._emit(_error_chunk(request_id, exc.code, exc.message))
        except Exception as exc:  # a bug in one request must not end the others' streams
            logger.exception("request %s failed", request_id)
            self._emit(_error_chunk(request_id, grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"))
        finally:
            if self.tasks.get(request_id) is asyncio.current_task():
                del self.tasks[request_id]
            self.wakeup.set()

    def _emit(self, chunk: pb.GenerateChunk) -> None:
        if not self.outbox:
            self.held_since = asyncio.get_running_loop().time()
        waiting = self.outbox.get(chunk.request_id)
        if waiting is None:
            self.outbox[chunk.request_id] = waiting = chunk
        else:
            waiting.MergeFrom(chunk)  # repeated fields append, set fields (finish, stats) replace
        if 0 < self.config.max_merged_tokens <= len(waiting.token_ids):
            self.overfull = True
        self.wakeup.set()

    def _take_outbox(self) -> list[pb.GenerateChunk]:
        chunks, self.outbox = list(self.outbox.values()), {}
        self.held_since, self.overfull = None, False
        if self.hold_timer is not None:
            self.hold_timer.cancel()
            self.hold_timer = None
        return chunks

    def _may_send(self) -> bool:
        """Credit left, or a merging bound passed while no message is borrowed yet."""
        if self.credit is None or self.credit > 0:
            return True
        return self.credit == 0 and self._held_too_long()

    def _held_too_long(self) -> bool:
        """True when the waiting chunks passed a merging bound and go out without credit."""
        if self.overfull:
            return True
        max_hold_s = self.config.max_hold_ms / 1000
        return max_hold_s > 0 and asyncio.get_running_loop().time() - self.held_since >= max_hold_s

    def _arm_hold_timer(self) -> None:
        """Wake the sender when the oldest waiting chunk reaches max_hold_ms."""
        if self.hold_timer is None and self.config.max_hold_ms > 0:
            loop = asyncio.get_running_loop()
            self.hold_timer = loop.call_at(self.held_since + self.config.max_hold_ms / 1000, self._hold_expired)

    def _hold_expired(self) -> None:
        self.hold_timer = None
        self.wakeup.set()


def split_output(chunks: list[pb.GenerateChunk], max_bytes: int = MESSAGE_SOFT_LIMIT_BYTES) -> list[pb.SessionOutput]:
    """The chunks as one SessionOutput, or as several when one would pass `max_bytes` (many requests
    with long merged logprobs behind a stalled client)."""
    message = pb.SessionOutput(chunks=chunks)
    if len(chunks) == 1 or message.ByteSize() <= max_bytes:
        return [message]
    half = len(chunks) // 2
    return split_output(chunks[:half], max_bytes) + split_output(chunks[half:], max_bytes)


def _error_chunk(request_id: str, code: grpc.StatusCode, message: str) -> pb.GenerateChunk:
    return pb.GenerateChunk(request_id=request_id, error=pb.RequestError(code=code.value[0], message=message))
