"""The gateway's FastAPI app: OpenAI-compatible endpoints in front of the workers.

    POST /v1/completions, POST /v1/chat/completions   (stream: SSE `data: {...}` ... `data: [DONE]`)
    POST /v1/responses, GET|DELETE /v1/responses/{id}[/input_items]  (the Responses API: responses_routes.py)
    GET  /health (ready: workers to route to), GET /livez (alive), GET /metrics
    GET  /v1/models[/{model}], POST /tokenize, POST /detokenize, GET /version, /ping (utility_routes.py)

A request: API key and body size (`_RequestGuard`, before the body is parsed) -> model check ->
admission slot -> prepare (validate, tokenize: prepare.py) -> one worker request per choice
(dispatch.py) -> text deltas (completion.py) -> OpenAI JSON (responses.py). Errors are mapped in
openai_protocol.py; during a stream they become an SSE error event followed by [DONE]. A client
that hangs up, streaming or not, cancels its request, and with it the worker calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from splitserve.services.gateway.admission import AdmissionQueue
from splitserve.services.gateway.chat_prompt_cache import ChatPromptCache
from splitserve.services.gateway.completion import choice_streams, merge_streams
from splitserve.services.gateway.config import GatewayConfig
from splitserve.services.gateway.discovery import Discovery
from splitserve.services.gateway.dispatch import Dispatcher
from splitserve.services.gateway.metrics import GatewayMetrics
from splitserve.services.gateway.openai_protocol import (
    APIError, body_timeout, body_too_large, install_error_handlers, model_not_found, service_unavailable, to_api_error,
    unauthorized)
from splitserve.services.gateway.prepare import (
    PrepareContext, PreparedRequest, longest_token_chars, name_after_client, prepare_chat, prepare_completion,
    text_chars)
from splitserve.services.gateway.request_models import ChatCompletionRequest, CompletionRequest
from splitserve.services.gateway.responses import SSE_DONE, ResponseBuilder, sse_event
from splitserve.services.gateway.response_store import ResponseStore
from splitserve.services.gateway.responses_routes import add_responses_routes
from splitserve.services.gateway.router import ROLES, Router, poll_loads, poll_once
from splitserve.services.gateway.utility_routes import add_utility_routes
from splitserve.services.gateway.worker_client import WorkerClient
from splitserve.shared.grpc_security import GrpcSecurity
from splitserve.shared.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

_COUNTED_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/models", "/health",
                            "/metrics", "/tokenize", "/detokenize"})
LONG_TEXT_CHARS = 32768
"""Requests with more text than this are tokenized on their own thread (`GatewayState`)."""
BODY_TIMEOUT_S = 60.0
"""Longest wait for a request's whole body once its headers are in (a client that sends less than
its Content-Length, or trickles it, holds a connection and its buffer until then)."""


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
    long_tokenize_pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "tokenize-long"))
    """Requests with more than LONG_TEXT_CHARS of text queue here instead, so that a few huge prompts
    (seconds each) never hold up the short ones (the Rust tokenizer releases the GIL)."""
    max_token_chars: int = 1
    chat_prompts: ChatPromptCache | None = None
    """Keyed chat sessions' last prompts (chat_prompt_cache.py); None with --chat-prompt-cache-mib 0."""
    response_store: ResponseStore | None = None  # /v1/responses kept (response_store.py)

    def resolve_model(self, model: str | None) -> str:
        """The name responses carry for a request's `model`: the first served name, whichever
        served name (or none) the request gave, as vLLM answers; 404 for any other."""
        if model is not None and model != self.config.served_model_name and model not in self.config.served_model_aliases:
            raise model_not_found(model)
        return self.config.served_model_name

    def max_model_len(self) -> int:
        value = self.config.max_model_len or self.router.max_model_len() or _checkpoint_max_len(self.config.model_dir)
        if value is None:
            raise service_unavailable("the model's context length is unknown until a worker reports it")
        return value

    def prepare_context(self) -> PrepareContext:
        return PrepareContext(self.tokenizer, self.max_model_len(), self.config.limits, self.max_token_chars,
                              self.config.agent_api, self.chat_prompts)


def build_app(config: GatewayConfig, *, tokenizer: Any = None,
              client_interceptors: Sequence[grpc.aio.ClientInterceptor] = (), api_key: str | None = None,
              security: GrpcSecurity = GrpcSecurity()) -> FastAPI:
    """The gateway app; workers are polled from startup to shutdown (the app's lifespan). With
    `api_key`, every /v1 route needs `Authorization: Bearer <api_key>`; `security` authenticates
    the gateway to the workers (shared/grpc_security.py)."""
    config.validate()
    state = GatewayState(
        config, tokenizer if tokenizer is not None else load_tokenizer(config.model_dir),
        Router(config.prefill_urls, config.decode_urls, config.worker_urls, affinity_blocks=config.affinity_blocks,
               overload_margin_tokens=config.overload_margin_tokens, default_block_size=config.default_block_size,
               decode_prefill_max_new_tokens=config.decode_prefill_max_new_tokens),
        AdmissionQueue(config.max_inflight_requests, config.max_queued_requests, config.queue_timeout_s,
                       config.retry_after_s),
        GatewayMetrics())
    state.max_token_chars = longest_token_chars(state.tokenizer)
    if config.chat_prompt_cache_mib:
        state.chat_prompts = ChatPromptCache.for_tokenizer(state.tokenizer, config.chat_prompt_cache_mib << 20)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        def make_client(url: str) -> WorkerClient:
            return WorkerClient(url, client_interceptors, session_window=config.session_window, security=security)

        clients = {i.url: make_client(i.url) for i in state.router.instances}
        state.dispatcher = Dispatcher(state.router, clients, state.metrics, prefill_timeout_s=config.prefill_timeout_s,
                                      generate_timeout_s=config.generate_timeout_s,
                                      abort_timeout_s=config.abort_timeout_s)
        discovery = Discovery(state.router, clients, make_client, config.dns_targets(), config.discovery_timeout_s)
        await discovery.refresh_once()
        await poll_once(state.router, clients, config.load_rpc_timeout_s)
        tasks = [asyncio.create_task(poll_loads(state.router, clients, config.load_poll_interval_s,
                                                config.load_rpc_timeout_s, config.stalled_after_polls))]
        if discovery.targets:
            tasks.append(asyncio.create_task(discovery.run(config.discovery_interval_s)))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await state.dispatcher.drain()
            await asyncio.gather(*(c.close() for c in clients.values()), return_exceptions=True)
            state.response_store.close()

    agent_api = config.agent_api
    state.response_store = ResponseStore(agent_api.response_store_dir, agent_api.response_store_size,
                                         agent_api.response_store_ttl_s, agent_api.response_store_timeout_s)
    app = FastAPI(title="splitserve gateway", lifespan=lifespan)
    app.state.gateway = state
    install_error_handlers(app)
    app.add_middleware(_RequestGuard, api_key=api_key, max_body_bytes=config.limits.max_request_body_bytes)
    app.add_middleware(_StatusCounter, metrics=state.metrics)
    _add_routes(app, state)
    add_responses_routes(app, state, _serve)
    add_utility_routes(app, state)
    return app


def _add_routes(app: FastAPI, state: GatewayState) -> None:
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await _serve(state, body, prepare_completion, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await _serve(state, body, prepare_chat, request)

    @app.get("/health")
    async def health() -> JSONResponse:
        # Names and states only: addresses and error text are internal (they are in the logs).
        workers = [{"name": i.name, "role": i.role, "healthy": i.routable()} for i in state.router.instances]
        ready = state.router.is_ready()
        return JSONResponse({"status": "ok" if ready else "unavailable", "workers": workers, "pid": os.getpid()},
                            status_code=200 if ready else 503)

    @app.get("/livez")
    async def livez() -> JSONResponse:
        # Liveness: this process's event loop answers. Unlike /health it does not depend on the
        # workers, so an orchestrator does not restart a gateway because its workers are down.
        return JSONResponse({"status": "alive", "pid": os.getpid()})

    @app.get("/metrics")
    async def metrics() -> Response:
        m = state.metrics
        for role in ROLES:
            m.healthy_workers.labels(role).set(len(state.router.healthy(role)))
        for instance in state.router.instances:
            if instance.load is not None:
                m.observe_worker(instance.name, instance.load)
        m.inflight.set(state.admission.num_inflight)
        m.queued.set(state.admission.num_queued)
        return Response(m.render(), media_type=m.content_type)


async def _serve(state: GatewayState, body: CompletionRequest | ChatCompletionRequest,
                 prepare: Callable[..., PreparedRequest], request: Request,
                 make_builder: Callable[[PreparedRequest], Any] | None = None) -> Response:
    """Run one OpenAI request; `make_builder` formats its output (default: completions / chat)."""
    body.model = state.resolve_model(body.model)
    slot = contextlib.AsyncExitStack()
    await slot.enter_async_context(state.admission.admit())
    try:
        pool = state.long_tokenize_pool if text_chars(body) > LONG_TEXT_CHARS else state.tokenize_pool
        prep = await asyncio.get_running_loop().run_in_executor(pool, prepare, body, state.prepare_context())
        name_after_client(prep, request.headers.get("x-request-id"))
        state.router.route(prep.prompts[0])  # fail with 503 now, not inside a 200 stream, if nothing is routable
        builder = make_builder(prep) if make_builder is not None else ResponseBuilder(prep, state.tokenizer)
        streams = choice_streams(prep, state.tokenizer, state.dispatcher, state.metrics)
    except BaseException:
        await slot.aclose()
        raise
    if prep.stream:
        # The slot is released when the body ends (before the last byte goes out, so a client that
        # read [DONE] finds it free) and, idempotently, when the response closes (the body may
        # never start if the client hangs up at once).
        # A structured request's spec is compiled by the worker: hold the status line until the
        # first event, so a spec that does not compile is a 400 rather than an error inside a 200.
        hold = prep.params.structured_outputs is not None
        return _SSEResponse(_sse_body(state, prep, builder, streams, slot, hold), on_close=slot.aclose,
                            hold_headers=hold)
    async with slot:
        if not await until_disconnect(_collect(builder, streams), request.receive):
            return Response(status_code=499)  # nobody reads it: the worker calls are cancelled
    state.metrics.e2e_s.observe(time.monotonic() - prep.arrival_s)
    return JSONResponse(builder.final_body())


async def _collect(builder, streams) -> None:
    async for delta in merge_streams(streams):
        builder.add(delta)


async def until_disconnect(work: Awaitable[Any], receive) -> bool:
    """Run `work` unless the client disconnects first (then cancel it and return False); a
    failure of `work` is raised."""
    working = asyncio.ensure_future(work)
    disconnect = asyncio.ensure_future(_wait_for_disconnect(receive))
    try:
        await asyncio.wait({working, disconnect}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (working, disconnect):
            task.cancel()
        await asyncio.gather(working, disconnect, return_exceptions=True)
    if working.cancelled():
        return False
    working.result()  # raises its failure
    return True


async def _sse_body(state: GatewayState, prep: PreparedRequest, builder, streams,
                    slot: contextlib.AsyncExitStack, raise_before_first: bool) -> AsyncIterator[bytes]:
    async with slot:
        async for event in _sse_events(state, prep, builder, streams, raise_before_first):
            yield event


async def _sse_events(state: GatewayState, prep: PreparedRequest, builder, streams,
                      raise_before_first: bool = False) -> AsyncIterator[bytes]:
    started = False
    try:
        async for delta in merge_streams(streams):
            builder.add(delta)
            started = True
            for event in builder.sse_chunks(delta):
                yield event
        for event in builder.sse_closing():
            yield event
        state.metrics.e2e_s.observe(time.monotonic() - prep.arrival_s)
    except Exception as exc:  # the status line is sent: report the failure in-band
        if raise_before_first and not started:
            raise  # the status line is still held (see _SSEResponse): answer with the error itself
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

    def __init__(self, body: AsyncIterator[bytes], on_close: Callable[[], Awaitable[Any]],
                 hold_headers: bool = False) -> None:
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close
        self._hold_headers = hold_headers

    async def stream_response(self, send) -> None:
        """With `hold_headers`, the status line waits for the first event; a failure before it
        is answered as the plain OpenAI error response it maps to."""
        if not self._hold_headers:
            return await super().stream_response(send)
        try:
            first = await anext(aiter(self.body_iterator), b"")
        except Exception as exc:
            error = to_api_error(exc)
            if error is None:
                raise
            return await _send_error(send, error)
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": first, "more_body": True})
        async for chunk in self.body_iterator:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await until_disconnect(self.stream_response(send), receive)
        finally:
            await self._on_close()


async def _wait_for_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _RequestGuard:
    """ASGI middleware in front of the routes: the API key on /v1 routes (401), then the body size
    (413), both before anything is parsed. The body is read here, up to the limit, and replayed to
    the app; later `receive` calls (the disconnect watch) go to the server."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.max_body_bytes = app, max_body_bytes
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.expected is not None and scope["path"].startswith("/v1") and not hmac.compare_digest(
                headers.get(b"authorization", b""), self.expected):
            return await _send_error(send, unauthorized())
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_body_bytes:
            return await _send_error(send, body_too_large(self.max_body_bytes))
        try:
            body = await asyncio.wait_for(self._read_body(receive), BODY_TIMEOUT_S)
        except TimeoutError:
            return await _send_error(send, body_timeout(BODY_TIMEOUT_S))
        if body is None:
            return await _send_error(send, body_too_large(self.max_body_bytes))
        if not _is_utf8(body):
            return await _send_error(send, APIError(400, "The request body is not valid UTF-8 (JSON text must be).",
                                                    "invalid_request_error", None, "invalid_encoding"))
        if body and not _declares_json(headers.get(b"content-type")):
            scope = {**scope, "headers": _json_content_type(scope["headers"])}
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read_body(self, receive) -> bytes | None:
        """The whole body, or None once it passes the limit (chunked uploads have no length)."""
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(parts)
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                return None
            parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(parts)


def _is_utf8(body: bytes) -> bool:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _declares_json(content_type: bytes | None) -> bool:
    media = (content_type or b"").split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


def _json_content_type(headers: list) -> list:
    """Every body here is JSON: one sent without a type, or as text/plain or form-urlencoded (curl -d
    without -H), is read as JSON too, instead of failing as 'not a valid dictionary' (a JSON error
    names the fault)."""
    return [(k, v) for k, v in headers if k != b"content-type"] + [(b"content-type", b"application/json")]


async def _send_error(send, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status_code,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


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
