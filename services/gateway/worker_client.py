"""The gateway's gRPC client of one worker: every call has a deadline; failures become WorkerError.

Protobuf stays inside this module: callers pass plain values and get `TokenChunk`s, `WorkerLoad`s
and `PrefillResult`s back. Cancelling the task that awaits a call (or closing the `generate`
iterator) cancels the RPC or, for a generation, sends an abort on the session, either of which
makes the worker abort the request.

Generations share one `Session` call per worker (services/worker/session.py): the worker sends one
message per engine step carrying every request's new tokens, where a call per request would cost a
gRPC message per token per request on both sides. The session is credit-based: a message is asked
for only after the streams woken by the previous one have handled it, so a gateway whose event
loop is the bottleneck receives merged, multi-token chunks (the worker merges while it waits for
credit) and its cost per token falls as its load rises. A request's chunks that still queue up
here while its consumer is busy (a slow HTTP client) are merged into one delta too, as vLLM's
output collector does.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc

from splitserve.services.gateway.config import GatewayConfig
from splitserve.shared import telemetry
from splitserve.shared.grpc_channel import aio_channel
from splitserve.shared.grpc_security import GrpcSecurity
from splitserve.shared.protocol import convert, worker_pb2 as pb, worker_pb2_grpc
from splitserve.shared.protocol.convert import TokenChunk, WorkerLoad
from splitserve.shared.request import SessionHint
from splitserve.shared.sampling_params import SamplingParams

# Codes that say "this worker is broken or gone" (the router marks it unhealthy), as opposed to
# "this request is bad" (INVALID_ARGUMENT) or "busy" (RESOURCE_EXHAUSTED).
_FAILURE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
                            grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED,
                            grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.DATA_LOSS})


class WorkerError(Exception):
    """A call to a worker failed; `code` is the gRPC status."""

    def __init__(self, url: str, method: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{method} on worker {url} failed: {code.name}: {details}")
        self.url, self.method, self.code, self.details = url, method, code, details

    @property
    def worker_failed(self) -> bool:
        """The worker itself is unhealthy (not just this request rejected)."""
        return self.code in _FAILURE_CODES


@dataclass
class WorkerRequest:
    """One generation on the workers: a single choice of one prompt."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    session: SessionHint | None = None
    """prompt_cache_key and its retention: the workers retain the request's blocks for it."""


@dataclass
class PrefillResult:
    first: TokenChunk
    """The first token (with finish_reason set if it already ended the request)."""
    handoff: pb.PrefillResponse
    """Opaque to callers: passed back to `generate` so the decode worker finds the KV."""

    @property
    def finished(self) -> bool:
        return self.first.finish_reason is not None


_CODES = {code.value[0]: code for code in grpc.StatusCode}


class WorkerClient:
    def __init__(self, url: str, interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
                 session_window: int = GatewayConfig.session_window, security: GrpcSecurity = GrpcSecurity()) -> None:
        """`session_window`: session messages in flight, one being handled here while the next is
        on its way (0: no credit; see GatewayConfig)."""
        self.url = url
        self.session_window = session_window
        self._channel = aio_channel(url, interceptors=interceptors, security=security)
        self._stub = worker_pb2_grpc.WorkerStub(self._channel)
        self._session: _Session | None = None
        self._prefills: set = set()  # Prefill calls in flight, for abandon_calls
        self._abandoned: str | None = None

    def abandon_calls(self, reason: str) -> None:
        """The worker stalled: end every open call on it now with UNAVAILABLE (see router.py)."""
        self._abandoned = reason
        if self._session is not None:
            self._session.abandon(WorkerError(self.url, "Generate", grpc.StatusCode.UNAVAILABLE, reason))
        for call in list(self._prefills):
            call.cancel()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        await self._channel.close(grace=None)

    async def prefill(self, req: WorkerRequest, timeout_s: float) -> PrefillResult:
        msg = pb.PrefillRequest(request_id=req.request_id, prompt_token_ids=req.prompt_token_ids,
                                sampling_params=convert.sampling_params_to_proto(req.params), priority=req.priority)
        if req.session is not None:
            msg.session.CopyFrom(convert.session_to_proto(req.session))
        call = self._stub.Prefill(msg, timeout=timeout_s)
        self._prefills.add(call)
        try:
            resp = await call
        except grpc.aio.AioRpcError as exc:
            raise self._error("Prefill", exc) from None
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                raise  # our caller was cancelled (its client left)
            raise WorkerError(self.url, "Prefill", grpc.StatusCode.UNAVAILABLE, self._abandoned or "cancelled") from None
        finally:
            self._prefills.discard(call)
        return PrefillResult(convert.chunk_from_prefill_response(resp), resp)

    async def generate(self, req: WorkerRequest, timeout_s: float,
                       prefill: PrefillResult | None = None) -> AsyncIterator[TokenChunk]:
        """Stream the request's new tokens; with `prefill`, decode from the KV that prefill holds.
        `timeout_s` bounds the whole stream."""
        msg = pb.GenerateRequest(request_id=req.request_id, prompt_token_ids=req.prompt_token_ids,
                                 sampling_params=convert.sampling_params_to_proto(req.params), priority=req.priority,
                                 trace_context=telemetry.context_carrier())
        if req.session is not None:
            msg.session.CopyFrom(convert.session_to_proto(req.session))
        if prefill is not None:
            msg.kv_handle.CopyFrom(prefill.handoff.kv_handle)
            msg.first_token.CopyFrom(prefill.handoff.first_token)
            # Prefill sent the prompt logprobs; a decode that recomputes the prompt must not again.
            msg.sampling_params.ClearField("prompt_logprobs")
        if self._session is None or self._session.failed is not None:
            self._session = _Session(self._stub, self.url, self.session_window)
        session = self._session
        stream = session.open(msg)
        # One timer per request bounds the whole stream (cheaper than a timeout on every wait).
        deadline = asyncio.get_running_loop().call_later(
            timeout_s, stream.put_nowait, WorkerError(self.url, "Generate", grpc.StatusCode.DEADLINE_EXCEEDED,
                                                      f"the stream did not end within {timeout_s:g} s"))
        finished = False
        try:
            while True:
                item = stream.get_nowait() if not stream.empty() else await stream.get()
                if (failure := self._failure_of(item)) is not None:
                    raise failure
                while not item.HasField("finish_reason") and not stream.empty():
                    following = stream.get_nowait()
                    if (failure := self._failure_of(following)) is not None:
                        break  # hand out what came before it first
                    item.MergeFrom(following)  # token lists append; the last chunk's fields win
                finished = item.HasField("finish_reason")
                yield convert.chunk_from_proto(item)
                if finished:
                    return
                if failure is not None:
                    raise failure
        finally:
            deadline.cancel()
            session.close_stream(req.request_id, abort=not finished)

    def _failure_of(self, item: pb.GenerateChunk | WorkerError) -> WorkerError | None:
        """The WorkerError that `item` (a chunk, or a failure of the session or deadline) carries."""
        if isinstance(item, WorkerError):
            return item
        if item.HasField("error"):
            return WorkerError(self.url, "Generate", _CODES.get(item.error.code, grpc.StatusCode.UNKNOWN),
                               item.error.message)
        return None

    async def abort(self, request_id: str, timeout_s: float) -> bool:
        try:
            resp = await self._stub.Abort(pb.AbortRequest(request_id=request_id), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self._error("Abort", exc) from None
        return resp.found

    async def get_load(self, timeout_s: float) -> WorkerLoad:
        try:
            report = await self._stub.GetLoad(pb.LoadRequest(), timeout=timeout_s, wait_for_ready=False)
        except grpc.aio.AioRpcError as exc:
            raise self._error("GetLoad", exc) from None
        return convert.load_from_proto(report)

    def _error(self, method: str, exc: grpc.aio.AioRpcError) -> WorkerError:
        return WorkerError(self.url, method, exc.code(), exc.details() or "")


_CREDIT_ONE = pb.SessionCommand(credit=1)


class _Session:
    """One `Session` call to a worker, shared by every generation the gateway sends it.

    Commands go out through a queue that gRPC drains, so sending one never blocks (an abort can be
    sent from a cancelled task). One reader hands each chunk to its request's queue. When the call
    ends, every open request gets the failure as a WorkerError and the client opens a new session
    for the next request."""

    def __init__(self, stub: worker_pb2_grpc.WorkerStub, url: str, window: int) -> None:
        self.url, self.window = url, window
        self.failed: WorkerError | None = None
        self._abandoned: WorkerError | None = None
        self._streams: dict[str, asyncio.Queue] = {}
        self._commands: asyncio.Queue = asyncio.Queue()
        # Opened outside the current request's context: the call outlives the request, and its own
        # span (when tracing is on) must not join that request's trace.
        self._call, self._reader = contextvars.Context().run(self._start, stub)

    def _start(self, stub: worker_pb2_grpc.WorkerStub):
        if self.window:
            self._commands.put_nowait(pb.SessionCommand(credit=self.window))
        call = stub.Session(self._outgoing())
        return call, asyncio.get_running_loop().create_task(self._read(call))

    async def _outgoing(self) -> AsyncIterator[pb.SessionCommand]:
        while (command := await self._commands.get()) is not None:
            yield command

    async def _read(self, call) -> None:
        failure = WorkerError(self.url, "Generate", grpc.StatusCode.UNKNOWN, "the session's reader failed")
        try:
            async for output in call:
                for chunk in output.chunks:
                    stream = self._streams.get(chunk.request_id)
                    if stream is not None:
                        stream.put_nowait(chunk)
                # The streams woken above run before this task resumes; only then is the next
                # message asked for, so a busy gateway gets merged chunks rather than a backlog.
                if self.window:
                    await asyncio.sleep(0)
                    self._commands.put_nowait(_CREDIT_ONE)
            failure = WorkerError(self.url, "Generate", grpc.StatusCode.UNAVAILABLE, "the worker ended the session")
        except grpc.aio.AioRpcError as exc:
            failure = WorkerError(self.url, "Generate", exc.code(), exc.details() or "")
        except asyncio.CancelledError:
            failure = WorkerError(self.url, "Generate", grpc.StatusCode.CANCELLED, "the gateway closed the session")
            raise
        finally:
            self.failed = failure = self._abandoned or failure
            for stream in self._streams.values():
                stream.put_nowait(failure)

    def abandon(self, failure: WorkerError) -> None:
        """End the call now; every open request gets `failure` (the worker stalled)."""
        if self.failed is None:
            self._abandoned = failure
            self._call.cancel()

    def open(self, msg: pb.GenerateRequest) -> asyncio.Queue:
        """Start a request; its chunks (or a WorkerError) arrive on the returned queue."""
        if msg.request_id in self._streams:
            raise ValueError(f"request id {msg.request_id!r} is already open on worker {self.url}")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[msg.request_id] = stream
        self._commands.put_nowait(pb.SessionCommand(generate=msg))
        return stream

    def close_stream(self, request_id: str, abort: bool) -> None:
        """Forget a request; with `abort`, stop it on the worker too (it had not finished)."""
        self._streams.pop(request_id, None)
        if abort and self.failed is None:
            self._commands.put_nowait(pb.SessionCommand(abort=pb.AbortRequest(request_id=request_id)))

    async def close(self) -> None:
        self._commands.put_nowait(None)
        self._call.cancel()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
