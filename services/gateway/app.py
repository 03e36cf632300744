"""The gateway's FastAPI app: OpenAI-compatible endpoints in front of the workers.

    POST /v1/completions, POST /v1/chat/completions   (stream: SSE `data: {...}` ... `data: [DONE]`)
    GET  /v1/models, GET /health, GET /metrics

A request: model check -> admission slot -> prepare (tokenize, validate) -> one worker request
per choice (dispatch.py) -> text deltas (completion.py) -> OpenAI JSON (responses.py). Errors are
mapped in openai_protocol.py; during a stream they become an SSE error event followed by [DONE].
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response, StreamingResponse

from splitserve.services.gateway.admission import AdmissionQueue
from splitserve.services.gateway.completion import (
    PreparedRequest, choice_streams, merge_streams, prepare_chat, prepare_completion)
from splitserve.services.gateway.config import GatewayConfig
from splitserve.services.gateway.dispatch import Dispatcher
from splitserve.services.gateway.metrics import GatewayMetrics
from splitserve.services.gateway.openai_protocol import (
    APIError, ChatCompletionRequest, CompletionRequest, install_error_handlers, model_not_found,
    service_unavailable, to_api_error)
from splitserve.services.gateway.responses import SSE_DONE, ResponseBuilder, sse_event
from splitserve.services.gateway.router import ROLES, Router, poll_loads, poll_once
from splitserve.services.gateway.worker_client import WorkerClient
from splitserve.shared.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

_COUNTED_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"})


@dataclass
class GatewayState:
    config: GatewayConfig
    tokenizer: Any
    router: Router
    admission: AdmissionQueue
    metrics: GatewayMetrics
    dispatcher: Dispatcher | None = None  # set at startup (its gRPC channels need the event loop)
    tokenize_pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "tokenize"))
    """Tokenization and chat templates run here, off the event loop (a long prompt must not stall
    every other stream); one thread, because HF tokenizers mutate state when encoding."""

    def max_model_len(self) -> int:
        value = self.config.max_model_len or self.router.max_model_len() or _checkpoint_max_len(self.config.model_dir)
        if value is None:
            raise service_unavailable("the model's context length is unknown until a worker reports it")
        return value


def build_app(config: GatewayConfig, *, tokenizer: Any = None,
              client_interceptors: Sequence[grpc.aio.ClientInterceptor] = ()) -> FastAPI:
    """The gateway app; workers are polled from startup to shutdown (the app's lifespan)."""
    config.validate()
    state = GatewayState(
        config, tokenizer if tokenizer is not None else load_tokenizer(config.model_dir),
        Router(config.prefill_urls, config.decode_urls, config.worker_urls, affinity_blocks=config.affinity_blocks,
               overload_margin_tokens=config.overload_margin_tokens, default_block_size=config.default_block_size),
        AdmissionQueue(config.max_inflight_requests, config.max_queued_requests, config.queue_timeout_s,
                       config.retry_after_s),
        GatewayMetrics())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        clients = {i.url: WorkerClient(i.url, client_interceptors, session_window=config.session_window)
                   for i in state.router.instances}
        state.dispatcher = Dispatcher(state.router, clients, state.metrics, prefill_timeout_s=config.prefill_timeout_s,
                                      generate_timeout_s=config.generate_timeout_s,
                                      abort_timeout_s=config.abort_timeout_s)
        await poll_once(state.router, clients, config.load_rpc_timeout_s)
        poller = asyncio.create_task(poll_loads(state.router, clients, config.load_poll_interval_s,
                                                config.load_rpc_timeout_s))
        try:
            yield
        finally:
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)
            await state.dispatcher.drain()
            await asyncio.gather(*(c.close() for c in clients.values()), return_exceptions=True)

    app = FastAPI(title="splitserve gateway", lifespan=lifespan)
    app.state.gateway = state
    install_error_handlers(app)
    app.add_middleware(_StatusCounter, metrics=state.metrics)
    _add_routes(app, state)
    return app


def _add_routes(app: FastAPI, state: GatewayState) -> None:
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Response:
        return await _serve(state, body, prepare_completion)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest) -> Response:
        return await _serve(state, body, prepare_chat)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        max_len = state.config.max_model_len or state.router.max_model_len()
        return {"object": "list", "data": [{"id": state.config.served_model_name, "object": "model",
                                            "created": 0, "owned_by": "splitserve", "max_model_len": max_len}]}

    @app.get("/health")
    async def health() -> JSONResponse:
        workers = [{"url": i.url, "role": i.role, "healthy": i.healthy, "error": i.last_error}
                   for i in state.router.instances]
        ready = state.router.is_ready()
        return JSONResponse({"status": "ok" if ready else "unavailable", "workers": workers, "pid": os.getpid()},
                            status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        m = state.metrics
        for role in ROLES:
            m.healthy_workers.labels(role).set(len(state.router.healthy(role)))
        for instance in state.router.instances:
            if instance.load is not None:
                m.observe_worker(instance.url, instance.load)
        m.inflight.set(state.admission.num_inflight)
        m.queued.set(state.admission.num_queued)
        return Response(m.render(), media_type=m.content_type)


async def _serve(state: GatewayState, body: CompletionRequest | ChatCompletionRequest,
                 prepare: Callable[..., PreparedRequest]) -> Response:
    if body.model != state.config.served_model_name:
        raise model_not_found(body.model)
    slot = contextlib.AsyncExitStack()
    await slot.enter_async_context(state.admission.admit())
    try:
        max_model_len = state.max_model_len()
        prep = await asyncio.get_running_loop().run_in_executor(
            state.tokenize_pool, prepare, body, state.tokenizer, max_model_len, state.config.max_n)
        state.router.route(prep.prompts[0])  # fail with 503 now, not inside a 200 stream, if nothing is routable
        builder = ResponseBuilder(prep, state.tokenizer)
        streams = choice_streams(prep, state.tokenizer, state.dispatcher, state.metrics)
    except BaseException:
        await slot.aclose()
        raise
    if prep.stream:
        # The slot is released when the body ends (before the last byte goes out, so a client that
        # read [DONE] finds it free) and, idempotently, when the response closes (the body may
        # never start if the client hangs up at once).
        return _SSEResponse(_sse_body(state, prep, builder, streams, slot), on_close=slot.aclose)
    async with slot:
        async for delta in merge_streams(streams):
            builder.add(delta)
    state.metrics.e2e_s.observe(time.monotonic() - prep.arrival_s)
    return JSONResponse(builder.final_body())


async def _sse_body(state: GatewayState, prep: PreparedRequest, builder: ResponseBuilder, streams,
                    slot: contextlib.AsyncExitStack) -> AsyncIterator[bytes]:
    async with slot:
        async for event in _sse_events(state, prep, builder, streams):
            yield event


async def _sse_events(state: GatewayState, prep: PreparedRequest, builder: ResponseBuilder,
                      streams) -> AsyncIterator[bytes]:
    try:
        async for delta in merge_streams(streams):
            builder.add(delta)
            yield sse_event(builder.chunk(delta))
        if prep.include_usage:
            yield sse_event(builder.usage_chunk())
        state.metrics.e2e_s.observe(time.monotonic() - prep.arrival_s)
    except Exception as exc:  # the status line is sent: report the failure in-band
        error = to_api_error(exc)
        if error is None:
            logger.exception("unexpected failure while streaming %s", prep.request_id)
            error = APIError(500, f"internal error: {type(exc).__name__}", "internal_error")
        else:
            logger.warning("stream %s failed: %s", prep.request_id, error.message)
        yield sse_event(error.body())
    yield SSE_DONE


class _SSEResponse(StreamingResponse):
    """Server-sent events that stop as soon as the client disconnects, then run `on_close`.

    Watching `receive` for `http.disconnect` ourselves (rather than relying on the server's ASGI
    version) guarantees a client that goes away while a worker is still prefilling cancels the
    stream at once, and with it the worker calls.
    """

    def __init__(self, body: AsyncIterator[bytes], on_close: Callable[[], Awaitable[Any]]) -> None:
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        streaming = asyncio.ensure_future(self.stream_response(send))
        disconnect = asyncio.ensure_future(_wait_for_disconnect(receive))
        try:
            await asyncio.wait({streaming, disconnect}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (streaming, disconnect):
                task.cancel()
            await asyncio.gather(streaming, disconnect, return_exceptions=True)
            await self._on_close()
        if streaming.done() and not streaming.cancelled() and streaming.exception() is not None:
            raise streaming.exception()


async def _wait_for_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _StatusCounter:
    """ASGI middleware counting responses by endpoint and status (streams included)."""

    def __init__(self, app, metrics: GatewayMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in _COUNTED_PATHS else "other"

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(path, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


def _checkpoint_max_len(model_dir: str) -> int | None:
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            return int(json.load(f).get("max_position_embeddings") or 0) or None
    except (OSError, ValueError):
        return None
