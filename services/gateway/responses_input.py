"""A Responses API request as the chat request the pipeline runs, and its input items as the
item resources `GET /v1/responses/{id}/input_items` lists.

    instructions + (stored conversation of previous_response_id) + input items
        message               -> a chat message (developer/system/user/assistant)
        function_call         -> the assistant message's tool_calls (consecutive calls merge)
        function_call_output  -> a `tool` message
        reasoning             -> dropped (chat templates drop earlier turns' reasoning too)

Instructions are not carried over from a previous response (OpenAI's rule): each request gives
its own.
"""

from __future__ import annotations

import secrets
from typing import Any

from pydantic import ValidationError

from splitserve.services.gateway.openai_protocol import bad_request
from splitserve.services.gateway.request_models import ChatCompletionRequest
from splitserve.services.gateway.responses_protocol import (
    FunctionCallItem, FunctionCallOutputItem, MessageItem, ResponsesRequest)


def chat_request(body: ResponsesRequest, history: list[dict[str, Any]],
                 session_key: str | None) -> tuple[ChatCompletionRequest, list[dict]]:
    """The chat request to run (keyed by `session_key`), and the conversation (without
    instructions) to store after it."""
    conversation = history + input_messages(body.input)
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    if not system + conversation:
        raise bad_request("input must not be empty", "input")
    fields = {"model": body.model, "messages": system + conversation, "tools": _chat_tools(body),
              "tool_choice": _chat_tool_choice(body), "parallel_tool_calls": body.parallel_tool_calls,
              "max_tokens": body.max_output_tokens, "temperature": body.temperature, "top_p": body.top_p,
              "seed": body.seed, "stream": body.stream, "user": body.user,
              "prompt_cache_key": session_key, "prompt_cache_retention": body.prompt_cache_retention}
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


# ---- input items as OpenAI's item resources (input_items) ----------------------------------

def input_item_resources(items: str | list) -> list[dict[str, Any]]:
    """The request's input as OpenAI lists it back: each item with an id and a status."""
    if isinstance(items, str):
        items = [MessageItem(role="user", content=items)]
    return [_item_resource(item) for item in items]


def _item_resource(item: Any) -> dict[str, Any]:
    if isinstance(item, MessageItem):
        if item.role == "assistant":
            return {"type": "message", "id": item_id("msg"), "role": "assistant", "status": "completed",
                    "content": [{"type": "output_text", "text": item.text(), "annotations": []}]}
        return {"type": "message", "id": item_id("msg"), "role": item.role, "status": "completed",
                "content": [{"type": "input_text", "text": item.text()}]}
    if isinstance(item, FunctionCallItem):
        return {"type": "function_call", "id": item_id("fc"), "call_id": item.call_id, "name": item.name,
                "arguments": item.arguments, "status": "completed"}
    if isinstance(item, FunctionCallOutputItem):
        return {"type": "function_call_output", "id": item_id("fco"), "call_id": item.call_id,
                "output": item.text(), "status": "completed"}
    return {"type": "reasoning", "id": item_id("rs"), "summary": []}  # its text is not kept (see input_messages)


def item_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"
