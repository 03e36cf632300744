"""A Responses API request as the chat request the pipeline runs, and the bounded store that
`previous_response_id` reads.

    instructions + (stored conversation of previous_response_id) + input items
        message               -> a chat message (developer/system/user/assistant)
        function_call         -> the assistant message's tool_calls (consecutive calls merge)
        function_call_output  -> a `tool` message
        reasoning             -> dropped (chat templates drop earlier turns' reasoning too)

Instructions are not carried over from a previous response (OpenAI's rule): each request gives
its own.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from splitserve.services.gateway.openai_protocol import APIError, bad_request
from splitserve.services.gateway.request_models import ChatCompletionRequest
from splitserve.services.gateway.responses_protocol import (
    FunctionCallItem, FunctionCallOutputItem, MessageItem, ResponsesRequest)


class ResponseStore:
    """Conversations of finished responses by id: at most `max_size`, each for `ttl_s`."""

    def __init__(self, max_size: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_size, self.ttl_s, self._clock = max_size, ttl_s, clock
        self._entries: OrderedDict[str, tuple[float, list[dict[str, Any]]]] = OrderedDict()

    def put(self, response_id: str, messages: list[dict[str, Any]]) -> None:
        self._drop_expired()
        if self.max_size == 0:
            return
        self._entries[response_id] = (self._clock() + self.ttl_s, messages)
        while len(self._entries) > self.max_size:
            self._entries.popitem(last=False)

    def get(self, response_id: str) -> list[dict[str, Any]] | None:
        self._drop_expired()
        entry = self._entries.get(response_id)
        return list(entry[1]) if entry is not None else None

    def __len__(self) -> int:
        return len(self._entries)

    def _drop_expired(self) -> None:
        now = self._clock()
        while self._entries and next(iter(self._entries.values()))[0] <= now:
            self._entries.popitem(last=False)


def previous_conversation(store: ResponseStore, response_id: str | None) -> list[dict[str, Any]]:
    if response_id is None:
        return []
    messages = store.get(response_id)
    if messages is None:
        raise APIError(404, f"Previous response with id '{response_id}' not found (responses are kept for "
                       f"{store.ttl_s:.0f} s, at most {store.max_size}).", "invalid_request_error",
                       "previous_response_id", "previous_response_not_found")
    return messages


def chat_request(body: ResponsesRequest, history: list[dict[str, Any]]) -> tuple[ChatCompletionRequest, list[dict]]:
    """The chat request to run, and the conversation (without instructions) to store after it."""
    conversation = history + input_messages(body.input)
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    if not system + conversation:
        raise bad_request("input must not be empty", "input")
    fields = {"model": body.model, "messages": system + conversation, "tools": _chat_tools(body),
              "tool_choice": _chat_tool_choice(body), "parallel_tool_calls": body.parallel_tool_calls,
              "max_tokens": body.max_output_tokens, "temperature": body.temperature, "top_p": body.top_p,
              "seed": body.seed, "stream": body.stream, "user": body.user}
    try:
        chat = ChatCompletionRequest(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise bad_request(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    return chat, conversation


def input_messages(items: str | list) -> list[dict[str, Any]]:
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, MessageItem):
            messages.append({"role": item.role, "content": item.text()})
        elif isinstance(item, FunctionCallItem):
            _assistant_for_calls(messages)["tool_calls"].append(
                {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}})
        elif isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text()})
    return messages


def _assistant_for_calls(messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The assistant message a function_call item belongs to: the previous one, or a new one."""
    if messages and messages[-1]["role"] == "assistant":
        messages[-1].setdefault("tool_calls", [])
        return messages[-1]
    messages.append({"role": "assistant", "content": None, "tool_calls": []})
    return messages[-1]


def _chat_tools(body: ResponsesRequest) -> list[dict[str, Any]] | None:
    if not body.tools:
        return None
    tools = []
    for i, tool in enumerate(body.tools):
        if tool.type != "function":
            raise bad_request(f"tools[{i}].type {tool.type!r} is not supported; only \"function\" tools are",
                              f"tools[{i}].type")
        if not tool.name:
            raise bad_request(f"tools[{i}].name is required", f"tools[{i}].name")
        function = {"name": tool.name, "description": tool.description, "parameters": tool.parameters,
                    "strict": tool.strict}
        tools.append({"type": "function", "function": {k: v for k, v in function.items() if v is not None}})
    return tools


def _chat_tool_choice(body: ResponsesRequest) -> Any:
    choice = body.tool_choice
    if choice is None or isinstance(choice, str):
        return choice
    return {"type": "function", "function": {"name": choice.name}}
