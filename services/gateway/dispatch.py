"""Serve one worker request (one choice) on the workers and stream its tokens back.

Life of a disaggregated request, as seen from here:

    route ─▶ Prefill (prefill instance) ─▶ first token [+ KV handle]
                 │ finished already? ─▶ done
                 ▼
             Generate(handle, first token) on the decode instance ─▶ token chunks ─▶ done

A colocated worker gets one Generate without a handle, and so does a decode instance that holds
most of a keyed session's next turn (route reason 'session-on-decode', see router.py). The route's
reason goes on the request's trace span and the routes metric; a keyed turn's tokens are
remembered as held by the instance that ran it. Failure and cancellation:

* the consumer stops iterating (client gone, stop string matched) or a call fails: the open gRPC
  call is cancelled, which aborts the request on that worker;
* the prefill instance may hold KV that no decode has taken yet (we were cancelled during Prefill,
  or before the decode stream produced anything): Abort is sent to the prefill instance so its
  blocks are freed at once instead of when the hold's lease runs out;
* an instance whose RPC failed is marked unhealthy in the router.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
from opentelemetry import trace

from splitserve.services.gateway.metrics import GatewayMetrics
from splitserve.services.gateway.router import Instance, Router
from splitserve.services.gateway.structured_outputs import spec_error
from splitserve.services.gateway.worker_client import WorkerClient, WorkerError, WorkerRequest
from splitserve.shared.protocol.convert import TokenChunk

logger = logging.getLogger(__name__)


class Dispatcher:
    def __init__(self, router: Router, clients: dict[str, WorkerClient], metrics: GatewayMetrics, *,
                 prefill_timeout_s: float, generate_timeout_s: float, abort_timeout_s: float) -> None:
        self.router, self.clients, self.metrics = router, clients, metrics
        self.prefill_timeout_s, self.generate_timeout_s = prefill_timeout_s, generate_timeout_s
        self.abort_timeout_s = abort_timeout_s
        self._background: set[asyncio.Task] = set()

    async def generate(self, req: WorkerRequest) -> AsyncIterator[TokenChunk]:
        """Token chunks of `req`, the first token first; raises NoHealthyWorker or WorkerError.

        A worker that fails before anything was streamed (it died since the last load poll) is
        marked unhealthy and the request is routed once more, so the client never sees it."""
        for attempt in range(2):
            route = self.router.route(req.prompt_token_ids, req.session.key if req.session else None)
            self._record_route(route)
            chunks = (self._stream(route.worker, req, None) if route.worker is not None
                      else self._disaggregated(route.prefill, route.decode, req))
            started = False
            output_ids: list[int] = []
            try:
                async for chunk in chunks:
                    started = True
                    output_ids += chunk.token_ids
                    yield chunk
                return
            except WorkerError as exc:
                if started or attempt > 0 or not exc.worker_failed:
                    raise spec_error(exc, req.params.structured_outputs) or exc  # a bad spec: a 400 naming it
                logger.warning("request %s: %s; routing it to another instance", req.request_id, exc)
            finally:
                await chunks.aclose()
                if req.session is not None and output_ids:
                    holder = route.worker or (route.decode if len(output_ids) > 1 else route.prefill)
                    self.router.remember_session(req.session.key, holder, req.prompt_token_ids + output_ids)

    def _record_route(self, route) -> None:
        self.metrics.routes.labels(route.reason).inc()
        span = trace.get_current_span()
        span.set_attribute("splitserve.route_reason", route.reason)
        for role in ("worker", "prefill", "decode"):
            if getattr(route, role) is not None:
                span.set_attribute(f"splitserve.route_{role}", getattr(route, role).url)

    async def _disaggregated(self, prefill: Instance, decode: Instance, req: WorkerRequest) -> AsyncIterator[TokenChunk]:
        # True while the prefill instance may hold KV for this request that no decode has taken.
        kv_may_be_held = True
        decode_chunks = first_decode = None
        try:
            with self.router.track(prefill, len(req.prompt_token_ids)):
                result = await self._call(prefill, "Prefill",
                                          self.clients[prefill.url].prefill(req, self.prefill_timeout_s))
            kv_may_be_held = not result.finished
            span = trace.get_current_span()
            span.add_event("splitserve.prefill_returned")
            if not result.finished:
                # The Generate goes to the decode instance before the first token is handed on, so
                # the consumer's work on that token (detokenizing, writing its SSE event) overlaps
                # the hand-off instead of delaying it.
                decode_chunks = self._stream(decode, req, result)
                first_decode = asyncio.ensure_future(_first_chunk(decode_chunks))
                await asyncio.sleep(0)  # the task runs up to its first wait: the Generate is queued
            yield result.first
            if result.finished:
                return
            chunk = await first_decode
            while chunk is not None:
                if kv_may_be_held:
                    span.add_event("splitserve.decode_first_chunk")
                kv_may_be_held = False  # the decode side has loaded (or recomputed) the prompt
                if chunk.finish_reason is not None:  # the prompt's cache hits were the prefill's
                    chunk.num_cache_hit_tokens = result.first.num_cache_hit_tokens
                yield chunk
                chunk = await anext(decode_chunks, None)
        finally:
            if first_decode is not None:
                first_decode.cancel()  # a no-op once it is done
                await asyncio.gather(first_decode, return_exceptions=True)
                await decode_chunks.aclose()  # cancels the call if we stopped early
            if kv_may_be_held:
                self.abort_in_background(prefill, req.request_id)

    async def _stream(self, instance: Instance, req: WorkerRequest, prefill_result) -> AsyncIterator[TokenChunk]:
        client = self.clients.get(instance.url)
        if client is None:  # discovery dropped it while the prompt was on a prefill instance
            raise WorkerError(instance.url, "Generate", grpc.StatusCode.UNAVAILABLE, "the worker left discovery")
        with self.router.track(instance, 0 if prefill_result else len(req.prompt_token_ids)):
            stream = client.generate(req, self.generate_timeout_s, prefill_result)
            try:
                async for chunk in stream:
                    yield chunk
            except WorkerError as exc:
                self._failed(instance, exc)
                raise
            finally:
                await stream.aclose()  # cancels the call if we stopped early

    async def _call(self, instance: Instance, method: str, awaitable):
        try:
            return await awaitable
        except WorkerError as exc:
            self._failed(instance, exc)
            raise

    def _failed(self, instance: Instance, exc: WorkerError) -> None:
        self.metrics.worker_failures.labels(instance.role, exc.method).inc()
        if exc.worker_failed:
            self.router.mark_failed(instance, str(exc))

    def abort_in_background(self, instance: Instance, request_id: str) -> None:
        """Abort `request_id` on `instance` without waiting (safe to call from a cancelled task)."""
        task = asyncio.get_running_loop().create_task(self._abort(instance, request_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _abort(self, instance: Instance, request_id: str) -> None:
        client = self.clients.get(instance.url)
        if client is None:  # gone from discovery: its KV lease frees what it held
            return
        try:
            await client.abort(request_id, self.abort_timeout_s)
        except WorkerError as exc:
            logger.info("abort of %s on %s failed: %s", request_id, instance.url, exc)

    async def drain(self, timeout_s: float = 2.0) -> None:
        """Wait (bounded) for background aborts, e.g. at shutdown."""
        if self._background:
            await asyncio.wait(list(self._background), timeout=timeout_s)


async def _first_chunk(chunks: AsyncIterator[TokenChunk]) -> TokenChunk | None:
    async for chunk in chunks:
        return chunk
    return None
