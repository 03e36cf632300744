"""The Responses API's stored responses: the SQLite ResponseStore (bounds, sharing, a store that
fails), GET / DELETE / input_items and prompt_cache_key through the real gateway and the `openai`
client (scripted tool-calling worker), strict function tools, and, on the real stack with two
gateway processes, a conversation continued on whichever process takes the connection."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3

import httpx
import openai
import pytest

from scripted_tools import MODEL, client as make_client, tool_stack
from splitserve.services.gateway.response_store import DATABASE_FILE, ResponseStore, StoredResponse
from splitserve.services.gateway.responses_routes import item_page

TOOLS = [{"type": "function", "name": "get_weather", "description": "Current weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
ASK = "What is the weather in Paris?"


def _record(response_id: str, text: str = "hi") -> StoredResponse:
    return StoredResponse(response_id, {"id": response_id}, [], [{"role": "user", "content": text}], response_id)


# ---- the store itself ---------------------------------------------------------------------------

@pytest.mark.parametrize("on_disk", [False, True])
def test_store_is_bounded_in_count_and_time(tmp_path, on_disk):
    now = [0.0]
    store = ResponseStore(str(tmp_path) if on_disk else None, max_size=2, ttl_s=10.0, clock=lambda: now[0])
    for name in ("a", "b", "c"):
        store.put_now(_record(name, name))
    assert store.get_now("a") is None and store.get_now("b").conversation[0]["content"] == "b" and store.get_now("c")
    now[0] = 10.0
    assert store.get_now("b") is None and store.count_now() == 0
    store.put_now(_record("d"))
    assert store.delete_now("d") and not store.delete_now("d") and store.get_now("d") is None
    store.close()


def test_stores_on_one_directory_share_their_responses(tmp_path):
    first, second = (ResponseStore(str(tmp_path), max_size=8, ttl_s=60.0) for _ in range(2))
    first.put_now(_record("resp_1", "from the first"))
    assert second.get_now("resp_1").conversation == [{"role": "user", "content": "from the first"}]
    assert second.delete_now("resp_1") and first.get_now("resp_1") is None
    first.close(), second.close()


def test_a_corrupt_or_missing_store_is_not_found_and_logged(tmp_path, caplog):
    directory = tmp_path / "store"
    store = ResponseStore(str(directory), max_size=8, ttl_s=60.0)
    store.put_now(_record("resp_1"))
    store.close()
    (directory / DATABASE_FILE).write_bytes(b"not a database " * 512)
    for name in os.listdir(directory):  # the WAL would still hold the row
        if name != DATABASE_FILE:
            os.remove(directory / name)
    corrupt = ResponseStore(str(directory), max_size=8, ttl_s=60.0)
    with caplog.at_level(logging.ERROR, "splitserve.services.gateway.response_store"):
        assert corrupt.get_now("resp_1") is None
        corrupt.put_now(_record("resp_2"))  # not kept, and no exception
        assert not corrupt.delete_now("resp_1")
    assert "not a database" in caplog.text
    corrupt.close()
    missing = ResponseStore(str(tmp_path / "gone"), max_size=8, ttl_s=60.0)
    os.rmdir(tmp_path / "gone")
    assert missing.get_now("resp_1") is None
    missing.close()


def test_a_store_locked_past_its_timeout_keeps_nothing_and_then_recovers(tmp_path, caplog):
    store = ResponseStore(str(tmp_path), max_size=8, ttl_s=60.0, timeout_s=0.2)
    store.put_now(_record("resp_1"))
    holder = sqlite3.connect(str(tmp_path / DATABASE_FILE), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process holding the write lock
    with caplog.at_level(logging.ERROR, "splitserve.services.gateway.response_store"):
        asyncio.run(store.put(_record("resp_2")))  # gives up after its timeout (SQLite's or the wait's)
    assert "database is locked" in caplog.text or "took over 0.2 s" in caplog.text
    # WAL: readers do not wait for the writer (this one runs after the put on the store's thread)
    assert asyncio.run(store.get("resp_1")) is not None
    holder.execute("ROLLBACK")
    holder.close()
    assert asyncio.run(store.get("resp_2")) is None
    asyncio.run(store.put(_record("resp_2")))
    assert asyncio.run(store.get("resp_2")) is not None
    store.close()


def test_item_page_follows_after_and_limit():
    items = [{"id": f"msg_{i}"} for i in range(5)]
    page = item_page(items, 2, None)
    assert [i["id"] for i in page["data"]] == ["msg_0", "msg_1"] and page["has_more"] and page["last_id"] == "msg_1"
    page = item_page(items, 2, "msg_3")
    assert [i["id"] for i in page["data"]] == ["msg_4"] and not page["has_more"] and page["first_id"] == "msg_4"


# ---- through the gateway (scripted worker) -----------------------------------------------------

@pytest.fixture(scope="module")
def stack():
    with tool_stack() as parts:
        yield parts


@pytest.mark.parametrize("streamed", [False, True])
def test_retrieve_returns_the_response_and_delete_forgets_it(stack, streamed):
    gateway, _, _ = stack
    client = make_client(gateway)
    if streamed:
        with client.responses.stream(model=MODEL, input=ASK, tools=TOOLS) as stream:
            list(stream)
            created = stream.get_final_response()
    else:
        created = client.responses.create(model=MODEL, input=ASK, tools=TOOLS)
    got = client.responses.retrieve(created.id)
    assert got.id == created.id and got.status == "completed" and got.usage == created.usage
    assert [(i.type, getattr(i, "call_id", None)) for i in got.output] == \
        [(i.type, getattr(i, "call_id", None)) for i in created.output]
    assert got.output_text == created.output_text
    raw = httpx.delete(f"{gateway.url}/v1/responses/{created.id}", timeout=10)
    assert raw.json() == {"id": created.id, "object": "response", "deleted": True}
    for call in (lambda: client.responses.retrieve(created.id), lambda: client.responses.delete(created.id),
                 lambda: client.responses.input_items.list(created.id)):
        with pytest.raises(openai.NotFoundError) as info:
            call()
        assert info.value.body["code"] == "response_not_found"


def test_client_delete_and_store_false(stack):
    gateway, _, _ = stack
    client = make_client(gateway)
    kept = client.responses.create(model=MODEL, input=ASK)
    assert client.responses.delete(kept.id) is None  # the client parses OpenAI's deletion object
    unkept = client.responses.create(model=MODEL, input=ASK, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unkept.id)


def test_input_items_are_listed_and_paged(stack):
    gateway, _, _ = stack
    client = make_client(gateway)
    first = client.responses.create(model=MODEL, input=ASK, tools=TOOLS)
    (call,) = [i for i in first.output if i.type == "function_call"]
    sent = [{"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
            {"role": "user", "content": "And tomorrow?"}]
    second = client.responses.create(model=MODEL, input=sent, tools=TOOLS)  # without previous_response_id
    newest_first = list(client.responses.input_items.list(second.id))
    assert [i.type for i in newest_first] == ["message", "function_call_output", "function_call"]
    assert newest_first[0].content[0].text == "And tomorrow?" and newest_first[1].output == "sunny"
    assert newest_first[2].call_id == call.call_id and json.loads(newest_first[2].arguments) == {"city": "Paris"}
    paged = list(client.responses.input_items.list(second.id, order="asc", limit=1))  # three pages, via `after`
    assert [i.id for i in paged] == [i.id for i in reversed(newest_first)]
    (only,) = client.responses.input_items.list(first.id).data
    assert only.role == "user" and only.content[0].text == ASK


@pytest.mark.parametrize("query,param", [({"limit": 0}, "limit"), ({"limit": "many"}, "limit"),
                                         ({"order": "sideways"}, "order"), ({"after": "msg_nope"}, "after"),
                                         ({"before": "msg_x"}, "before"), ({"include": "x"}, "include")])
def test_bad_input_item_queries(stack, query, param):
    gateway, _, _ = stack
    created = make_client(gateway).responses.create(model=MODEL, input=ASK)
    resp = httpx.get(f"{gateway.url}/v1/responses/{created.id}/input_items", params=query, timeout=10)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text


def test_retrieve_refuses_what_it_does_not_serve(stack):
    gateway, _, _ = stack
    created = make_client(gateway).responses.create(model=MODEL, input=ASK)
    for query, param in (({"stream": "true"}, "stream"), ({"include": "reasoning.encrypted_content"}, "include")):
        resp = httpx.get(f"{gateway.url}/v1/responses/{created.id}", params=query, timeout=10)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text


def test_prompt_cache_key_reaches_the_worker_and_chains_inherit_one(stack):
    gateway, worker, _ = stack
    client = make_client(gateway)
    keyed = client.responses.create(model=MODEL, input=ASK, prompt_cache_key="agent-7",
                                    extra_body={"prompt_cache_retention": "24h"})
    assert worker.record.generates[-1].session.key == "agent-7"
    assert worker.record.generates[-1].session.retention_s == 24 * 3600
    assert keyed.prompt_cache_key == "agent-7"
    client.responses.create(model=MODEL, input="more", previous_response_id=keyed.id)
    assert worker.record.generates[-1].session.key == "agent-7"  # inherited from the chain
    root = client.responses.create(model=MODEL, input=ASK)
    assert not worker.record.generates[-1].HasField("session")  # a lone response is not a session
    second = client.responses.create(model=MODEL, input="more", previous_response_id=root.id)
    assert worker.record.generates[-1].session.key == root.id  # the chain's first response names it
    client.responses.create(model=MODEL, input="again", previous_response_id=second.id)
    assert worker.record.generates[-1].session.key == root.id


@pytest.mark.parametrize("body,param", [
    ({"tools": [{**TOOLS[0], "cache_control": {"type": "ephemeral"}}]}, "tools.0.cache_control"),
    ({"tools": [{"type": "web_search", "search_context_size": "low"}]}, "tools[0].type"),
    ({"prompt_cache_key": ""}, "prompt_cache_key"),
    ({"prompt_cache_retention": "24h"}, "prompt_cache_retention"),  # without a key
])
def test_bad_tool_and_cache_fields(stack, body, param):
    gateway, _, _ = stack
    resp = httpx.post(f"{gateway.url}/v1/responses", json={"model": MODEL, "input": ASK, **body}, timeout=10)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text


def test_chat_tool_definitions_refuse_unknown_keys(stack):
    gateway, _, _ = stack
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}, "examples": []}}
    resp = httpx.post(f"{gateway.url}/v1/chat/completions", timeout=10, json={
        "model": MODEL, "messages": [{"role": "user", "content": ASK}], "tools": [tool]})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "tools.0.function.examples", resp.text


# ---- the real stack: two gateway processes, one store ------------------------------------------

@pytest.mark.slow
def test_a_conversation_continues_on_either_gateway_process(two_gateway_stack):
    """Each request on a new connection, so the kernel spreads them over both processes (their
    pids, from /health, show both serve); with a store per process about half the next turns,
    retrievals and deletions would miss. The second turn reuses the first's KV (cached_tokens).
    (The random demo model will not open a call, so the strict tool only shows the worker runs it.)
    The stack is shared with test_stack_e2e.py (conftest.two_gateway_stack)."""
    clients = []

    def fresh():  # a client of its own: a new connection
        clients.append(openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=60))
        return clients[-1]

    question = "Tell me about the weather in Paris today, and what I should wear for a long walk outside."
    stack = two_gateway_stack()
    assert len({httpx.get(f"{stack.url}/health").json()["pid"] for _ in range(40)}) == 2
    # A strict tool under tool_choice auto: the worker compiles and runs its structural tag.
    strict = fresh().responses.create(model="splitserve-demo", input=question, max_output_tokens=8, temperature=0,
                                      tools=[{**TOOLS[0], "strict": True}])
    assert strict.status in ("completed", "incomplete")
    for turn in range(8):
        first = fresh().responses.create(model="splitserve-demo", input=f"{turn}: {question}",
                                         max_output_tokens=4, temperature=0)
        second = fresh().responses.create(model="splitserve-demo", input="And tomorrow?", max_output_tokens=4,
                                          temperature=0, previous_response_id=first.id)
        assert second.previous_response_id == first.id
        assert second.usage.input_tokens > first.usage.input_tokens
        assert second.usage.input_tokens_details.cached_tokens > 0
        assert fresh().responses.retrieve(second.id).output_text == second.output_text
        assert [i.content[0].text for i in fresh().responses.input_items.list(second.id)] == ["And tomorrow?"]
        fresh().responses.delete(first.id)
        with pytest.raises(openai.NotFoundError):
            fresh().responses.retrieve(first.id)
        while clients:
            clients.pop().close()
