"""The Responses API's routes, around the one generation path (`serve`, app.py):

    POST   /v1/responses                          create (stream: typed SSE events)
    GET    /v1/responses/{id}                     the stored Response object
    DELETE /v1/responses/{id}                     {"id", "object": "response", "deleted": true}
    GET    /v1/responses/{id}/input_items         {"object": "list", "data", "first_id", "last_id", "has_more"}

A created response with `store` true is kept (response_store.py) BEFORE its client gets it (the
JSON body, or the stream's `response.completed` event), so a next turn sent as soon as the client
has it finds it, whichever gateway process takes that connection. An id that is unknown, expired,
deleted, or sent with `store: false` is a 404.

Session key of a turn (prompt_cache_key, sessions.py): the one it gives; else, with
previous_response_id, its previous response's chain key, which is that response's own key or
inherited one, and for a chain whose first turn had none, the first response's id. Every turn of a
chain is then one session: routed back to the instance holding the last turn, and retained there.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from splitserve.services.gateway.openai_protocol import APIError, bad_request
from splitserve.services.gateway.prepare import prepare_chat
from splitserve.services.gateway.response_store import ResponseStore, StoredResponse
from splitserve.services.gateway.responses_input import chat_request, input_item_resources
from splitserve.services.gateway.responses_output import ResponsesBuilder
from splitserve.services.gateway.responses_protocol import ResponsesRequest

MAX_LIST_LIMIT = 100


def add_responses_routes(app: FastAPI, state: Any, serve: Callable[..., Awaitable[Response]]) -> None:
    """`state`: the GatewayState (its response_store and tokenizer); `serve`: app._serve."""
    store: ResponseStore = state.response_store

    @app.post("/v1/responses")
    async def create_response(body: ResponsesRequest, request: Request) -> Response:
        previous = await _previous(store, body.previous_response_id)
        key = session_key(body, previous)
        chat, conversation = chat_request(body, previous.conversation if previous else [], key)
        builders: list[ResponsesBuilder] = []

        def make_builder(prep) -> ResponsesBuilder:
            builders.append(ResponsesBuilder(prep, body, conversation, input_item_resources(body.input), key,
                                             state.tokenizer))
            return builders[0]

        response = await serve(state, chat, prepare_chat, request, make_builder)
        if isinstance(response, StreamingResponse):
            response.body_iterator = _kept_before_next(response.body_iterator, builders[0], store)
        elif builders and builders[0].record is not None:
            await store.put(builders[0].record)
        return response

    @app.get("/v1/responses/{response_id}")
    async def retrieve_response(response_id: str, stream: bool = False,
                                include: list[str] = Query(default=[])) -> JSONResponse:
        if stream:
            raise bad_request("stream is not supported when retrieving a response (it is complete)", "stream")
        _no_include(include)
        return JSONResponse((await _stored(store, response_id)).response)

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str) -> JSONResponse:
        if not await store.delete(response_id):
            raise not_found(response_id)
        return JSONResponse({"id": response_id, "object": "response", "deleted": True})

    @app.get("/v1/responses/{response_id}/input_items")
    async def list_input_items(response_id: str, limit: int = 20, order: Literal["asc", "desc"] = "desc",
                               after: str | None = None, before: str | None = None,
                               include: list[str] = Query(default=[])) -> JSONResponse:
        if before is not None:
            raise bad_request("before is not supported by this server; page with after", "before")
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise bad_request(f"limit must be between 1 and {MAX_LIST_LIMIT}, got {limit}", "limit")
        _no_include(include)
        items = (await _stored(store, response_id)).input_items
        return JSONResponse(item_page(items if order == "asc" else items[::-1], limit, after))


def session_key(body: ResponsesRequest, previous: StoredResponse | None) -> str | None:
    if body.prompt_cache_key is not None:
        return body.prompt_cache_key
    return previous.session_key if previous is not None else None


def item_page(items: list[dict[str, Any]], limit: int, after: str | None) -> dict[str, Any]:
    """OpenAI's list object: up to `limit` of `items` (already in the asked order) after the one
    whose id is `after`."""
    start = 0
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise bad_request(f"after names no input item of this response: {after!r}", "after")
        start = ids.index(after) + 1
    page = items[start:start + limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": start + limit < len(items)}


def not_found(response_id: str) -> APIError:
    return APIError(404, f"Response with id '{response_id}' not found.", "invalid_request_error", "response_id",
                    "response_not_found")


async def _stored(store: ResponseStore, response_id: str) -> StoredResponse:
    found = await store.get(response_id)
    if found is None:
        raise not_found(response_id)
    return found


async def _previous(store: ResponseStore, response_id: str | None) -> StoredResponse | None:
    if response_id is None:
        return None
    found = await store.get(response_id)
    if found is None:
        raise APIError(404, f"Previous response with id '{response_id}' not found (responses are kept for "
                       f"{store.ttl_s:.0f} s, at most {store.max_size}).", "invalid_request_error",
                       "previous_response_id", "previous_response_not_found")
    return found


def _no_include(include: list[str]) -> None:
    if include:
        raise bad_request("include is not supported by this server: nothing extra is kept", "include")


_ERROR_EVENT = b'data: {"error":'
"""How the generation path reports a failure inside a stream (app._sse_events: chat's format)."""


async def _kept_before_next(events: AsyncIterator[bytes], builder: ResponsesBuilder,
                            store: ResponseStore) -> AsyncIterator[bytes]:
    """The stream's events; once the builder has its record (the closing event is next), it is
    stored before that event goes out. A failure reported in chat's format becomes the Responses
    stream's typed `error` event."""
    async with contextlib.aclosing(events):  # closed with us (a client that hangs up)
        async for event in events:
            if builder.record is not None:
                record, builder.record = builder.record, None
                await store.put(record)
            if event.startswith(_ERROR_EVENT):
                event = builder.sse_error(json.loads(event[len(b"data: "):])["error"])
            yield event
