"""The gateway's gRPC client of one worker: every call has a deadline; failures become WorkerError.

Protobuf stays inside this module: callers pass plain values and get `TokenChunk`s, `WorkerLoad`s
and `PrefillResult`s back. Cancelling the task that awaits a call (or closing the `generate`
iterator) cancels the RPC, which makes the worker abort the request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc

from splitserve.shared.grpc_channel import aio_channel
from splitserve.shared.protocol import convert, worker_pb2 as pb, worker_pb2_grpc
from splitserve.shared.protocol.convert import TokenChunk, WorkerLoad
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


@dataclass
class PrefillResult:
    first: TokenChunk
    """The first token (with finish_reason set if it already ended the request)."""
    handoff: pb.PrefillResponse
    """Opaque to callers: passed back to `generate` so the decode worker finds the KV."""

    @property
    def finished(self) -> bool:
        return self.first.finish_reason is not None


class WorkerClient:
    def __init__(self, url: str, interceptors: Sequence[grpc.aio.ClientInterceptor] = ()) -> None:
        self.url = url
        self._channel = aio_channel(url, interceptors=interceptors)
        self._stub = worker_pb2_grpc.WorkerStub(self._channel)

    async def close(self) -> None:
        await self._channel.close(grace=None)

    async def prefill(self, req: WorkerRequest, timeout_s: float) -> PrefillResult:
        msg = pb.PrefillRequest(request_id=req.request_id, prompt_token_ids=req.prompt_token_ids,
                                sampling_params=convert.sampling_params_to_proto(req.params), priority=req.priority)
        try:
            resp = await self._stub.Prefill(msg, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self._error("Prefill", exc) from None
        return PrefillResult(convert.chunk_from_prefill_response(resp), resp)

    async def generate(self, req: WorkerRequest, timeout_s: float,
                       prefill: PrefillResult | None = None) -> AsyncIterator[TokenChunk]:
        """Stream the request's new tokens; with `prefill`, decode from the KV that prefill holds."""
        msg = pb.GenerateRequest(request_id=req.request_id, prompt_token_ids=req.prompt_token_ids,
                                 sampling_params=convert.sampling_params_to_proto(req.params), priority=req.priority)
        if prefill is not None:
            msg.kv_handle.CopyFrom(prefill.handoff.kv_handle)
            msg.first_token.CopyFrom(prefill.handoff.first_token)
        call = self._stub.Generate(msg, timeout=timeout_s)
        try:
            async for chunk in call:
                yield convert.chunk_from_proto(chunk)
        except grpc.aio.AioRpcError as exc:
            raise self._error("Generate", exc) from None
        finally:
            call.cancel()  # no-op when the stream already ended; aborts the request on the worker otherwise

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
