"""The `Worker` gRPC service over one `AsyncEngine`: the same code serves every role.

    prefill   : Prefill  -> runs the prompt, samples the first token, holds the KV, returns a handle
    decode    : Generate(handle, first token) -> loads the KV from the prefill instance, decodes
    colocated : Generate -> does both phases here
    all       : Session (Generates multiplexed on one stream, see session.py), Abort, GetLoad, Health

Draining (SIGTERM, see main.py): new Prefill and Generate calls are refused with UNAVAILABLE, which
the gateway takes as "route it elsewhere"; GetLoad and Health say so; the calls already here run
to their end (`num_inflight` counts them).

Glue only: parse the proto, call the engine, serialize. A client that cancels its call or sends
an abort on its session (the gateway saw its HTTP client leave) cancels the request's task, which
aborts the request and frees its blocks (see AsyncEngine.generate).
"""

from __future__ import annotations

import contextlib
import logging

import grpc
from opentelemetry.trace import Status, StatusCode

from splitserve.services.worker.config import SessionConfig
from splitserve.services.worker.session import RequestFailed, serve_session
from splitserve.shared import telemetry
from splitserve.shared.async_engine import AsyncEngine, EngineBusyError, EngineDeadError, RequestFailedInEngine
from splitserve.shared.protocol import convert
from splitserve.shared.protocol import worker_pb2 as pb
from splitserve.shared.protocol import worker_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)


class WorkerServicer(pb_grpc.WorkerServicer):
    def __init__(self, engine: AsyncEngine, session_config: SessionConfig = SessionConfig()) -> None:
        self.engine = engine
        self._reported_failure = False
        self.session_config = session_config
        self.draining = False
        self.num_inflight = 0
        """Prefill and Generate calls (session streams included) being served now."""

    @contextlib.contextmanager
    def _inflight(self):
        if self.draining:
            raise RequestFailed(grpc.StatusCode.UNAVAILABLE, "this worker is draining (shutting down); "
                                "send the request to another one")
        self.num_inflight += 1
        try:
            yield
        finally:
            self.num_inflight -= 1

    async def Prefill(self, request: pb.PrefillRequest, context) -> pb.PrefillResponse:
        if self.engine.role != "prefill":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"this worker's role is {self.engine.role}, not prefill")
        try:
            with self._inflight():
                return await self._prefill(request, context)
        except RequestFailed as exc:
            await context.abort(exc.code, exc.message)

    async def _prefill(self, request: pb.PrefillRequest, context) -> pb.PrefillResponse:
        try:
            params = convert.sampling_params_from_proto(request.sampling_params)
            session = convert.session_from_proto(request.session) if request.HasField("session") else None
        except ValueError as exc:
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        with telemetry.span("prefill", **{"splitserve.request_id": request.request_id,
                                          "splitserve.prompt_tokens": len(request.prompt_token_ids)}) as span:
            final = None
            try:
                async for out in self.engine.generate(request.request_id, list(request.prompt_token_ids), params,
                                                      priority=request.priority, hold_kv=True, session=session):
                    final = out
            except (ValueError, EngineDeadError, RequestFailedInEngine, EngineBusyError) as exc:
                await _abort_for(context, exc)
            if final is None or final.finish_reason == "abort":
                await context.abort(grpc.StatusCode.CANCELLED, f"request {request.request_id} was aborted")
            span.set_attribute("splitserve.cached_tokens", final.num_cached_tokens)
            span.set_attribute("splitserve.kv_held_blocks", final.kv_handle.num_blocks if final.kv_handle else 0)
            return convert.engine_output_to_prefill_response(final)

    async def Generate(self, request: pb.GenerateRequest, context):
        try:
            async for chunk in self.open_stream(request):
                yield chunk
        except RequestFailed as exc:
            await context.abort(exc.code, exc.message)

    async def Session(self, request_iterator, context):
        async for output in serve_session(request_iterator, self.open_stream, self.session_config):
            yield output

    async def open_stream(self, request: pb.GenerateRequest):
        """The chunks of one Generate, for the Generate RPC and for a Session; raises RequestFailed."""
        with self._inflight():
            kv_handle, first_token, params, session = self._parse(request)
            # One generator between the engine's outputs and the caller: this runs per token.
            with telemetry.span("decode" if kv_handle else "generate", carrier=request.trace_context,
                                **{"splitserve.request_id": request.request_id}) as span:
                first = True
                try:
                    async for out in self.engine.generate(request.request_id, list(request.prompt_token_ids), params,
                                                          priority=request.priority, kv_handle=kv_handle,
                                                          first_token=first_token, session=session):
                        if first:
                            span.add_event("splitserve.first_output")
                            first = False
                        if out.finished:
                            _record_final(span, out)
                        yield convert.engine_output_to_chunk(out)
                except EngineDeadError as exc:
                    raise RequestFailed(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
                except RequestFailedInEngine as exc:  # this request only: the worker is fine
                    raise RequestFailed(grpc.StatusCode.ABORTED, str(exc)) from None
                except EngineBusyError as exc:  # the gateway answers 429: try again
                    raise RequestFailed(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
                except ValueError as exc:
                    raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None

    def _parse(self, request: pb.GenerateRequest):
        """(kv handle, first token, sampling params, session hint) of a Generate; raises RequestFailed."""
        if request.HasField("kv_handle") and self.engine.role != "decode":
            raise RequestFailed(grpc.StatusCode.FAILED_PRECONDITION, "a KV handle can only be loaded by a decode worker")
        if not request.HasField("kv_handle") and self.engine.role == "prefill":
            raise RequestFailed(grpc.StatusCode.FAILED_PRECONDITION, "a prefill worker does not decode")
        kv_handle = first_token = None
        try:
            params = convert.sampling_params_from_proto(request.sampling_params)
            session = convert.session_from_proto(request.session) if request.HasField("session") else None
            if request.HasField("kv_handle"):
                if not request.HasField("first_token"):
                    raise ValueError("kv_handle requires first_token")
                kv_handle = convert.kv_handle_from_proto(request.kv_handle)
                first_token = convert.first_token_from_proto(request.first_token)
        except ValueError as exc:
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        return kv_handle, first_token, params, session

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        return pb.AbortResponse(found=await self.engine.abort_request(request.request_id))

    async def GetLoad(self, request: pb.LoadRequest, context) -> pb.LoadReport:
        problem = self.problem()
        if problem is not None:  # the gateway's router marks this worker unhealthy
            await context.abort(grpc.StatusCode.UNAVAILABLE, problem)
        return convert.load_to_proto(worker_load(self.engine, self.draining))

    async def Health(self, request: pb.HealthRequest, context) -> pb.HealthResponse:
        problem = self.problem()
        message = problem or ("draining" if self.draining else "ok")
        return pb.HealthResponse(ready=problem is None and not self.draining, instance_id=self.engine.instance_id,
                                 message=message)

    def problem(self) -> str | None:
        """Why this worker cannot serve (its engine died, its KV transfer plane died), or None."""
        if self.engine.failure is not None:
            return f"engine failed: {self.engine.failure}"
        failure = self.engine.connector_failure  # the connector lives in the engine process
        if failure is None:
            return None
        if not self._reported_failure:  # asked every poll: say it once
            self._reported_failure = True
            logger.error("KV transfer plane failed, this worker reports itself unhealthy: %s", failure)
        return "KV transfer plane failed"

    def idle(self) -> bool:
        """Nothing left to finish: no call being served, nothing queued, no KV held for a decode peer."""
        s = self.engine.load()
        return self.num_inflight == 0 and s.num_running + s.num_waiting + s.num_loading_kv + s.num_held_kv == 0


def worker_load(engine: AsyncEngine, draining: bool = False) -> convert.WorkerLoad:
    s = engine.load()
    counters = {"num_preemptions": s.num_preemptions, **engine.counters,
                **{f"kv_blocks_{group}": n for group, n in s.kv_group_blocks.items()},  # the layer-group split
                **{f"kv_free_blocks_{group}": n for group, n in s.kv_group_free_blocks.items()}}
    return convert.WorkerLoad(
        instance_id=engine.instance_id, role=engine.role, model_name=engine.model_name,
        max_model_len=engine.max_model_len, block_size=engine.block_size, num_running=s.num_running,
        num_waiting=s.num_waiting + s.num_loading_kv, num_waiting_tokens=s.num_waiting_tokens,
        num_free_blocks=s.num_free_blocks, num_total_blocks=s.num_total_blocks, kv_usage=s.kv_usage,
        prefix_hit_rate=s.prefix_hit_rate, counters=counters, draining=draining,
    )


def _record_final(span, out) -> None:
    span.set_attribute("splitserve.kv_bytes_received", out.kv_bytes_received)
    span.set_attribute("splitserve.recomputed_tokens", out.num_recomputed_tokens)
    span.set_attribute("splitserve.cached_tokens", out.num_cached_tokens)
    if out.kv_load_window_ns is not None:
        start, end, ok = out.kv_load_window_ns
        transfer = telemetry.tracer().start_span("kv_transfer", start_time=start, attributes={
            "splitserve.kv_bytes": out.kv_bytes_received, "splitserve.ok": ok})
        if not ok:
            transfer.set_status(Status(StatusCode.ERROR, "transfer failed; prompt recomputed"))
        transfer.end(end_time=end or None)


async def _abort_for(context, exc: Exception) -> None:
    if isinstance(exc, EngineDeadError):
        await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
    if isinstance(exc, RequestFailedInEngine):
        await context.abort(grpc.StatusCode.ABORTED, str(exc))
    if isinstance(exc, EngineBusyError):
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
