"""Responses API bodies: the `response` object and its streamed events.

A choice's text is read by the same reasoning and tool parsers as chat (chat_output.py) and
becomes output items, in order: `reasoning`, `message` (output_text), `function_call`. Streamed,
each item is opened (`response.output_item.added`), grows by deltas (`response.reasoning_text.delta`,
`response.output_text.delta`, `response.function_call_arguments.delta`) and is closed (`*.done`,
`response.output_item.done`) when the next kind begins or the output ends; `response.created`
comes first and `response.completed` (or `response.incomplete` at max_output_tokens, the item
the limit cut marked `incomplete`) last; a failure after the start is an `error` event instead.
A finished response with `store` true leaves its `record` (the response, its input items and
the conversation so far) for the caller to keep in the ResponseStore, before the client gets it.
"""

from __future__ import annotations

import json
from typing import Any

from splitserve.services.gateway.chat_output import ChatDelta, ChatOutputStream, parse_chat_output
from splitserve.services.gateway.completion import ChoiceDelta
from splitserve.services.gateway.prepare import PreparedRequest
from splitserve.services.gateway.response_store import StoredResponse
from splitserve.services.gateway.responses_input import item_id as _item_id
from splitserve.services.gateway.responses_protocol import ResponsesRequest


def reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"type": "reasoning", "id": item_id, "summary": [], "status": status,
            "content": [{"type": "reasoning_text", "text": text}]}


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"type": "message", "id": item_id, "role": "assistant", "status": status,
            "content": [output_text(text)] if text or status == "completed" else []}


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


class ResponsesBuilder:
    """Same interface as responses.ResponseBuilder: add(), final_body(), sse_chunks(), sse_closing()."""

    def __init__(self, prep: PreparedRequest, body: ResponsesRequest, conversation: list[dict[str, Any]],
                 input_items: list[dict[str, Any]], session_key: str | None, tokenizer: Any) -> None:
        self.prep, self.body, self.conversation, self.input_items = prep, body, conversation, input_items
        self.session_key, self.tokenizer = session_key, tokenizer
        self.response_id = _item_id("resp")
        self.record: StoredResponse | None = None
        """Set when the response is complete and `store` is true: what the caller keeps."""
        self._text_parts: list[str] = []
        self.num_completion_tokens = self.num_cached_tokens = 0
        self.finish_reason: str | None = None
        self._stream = ChatOutputStream(prep.output)
        self._items: list[dict[str, Any]] = []  # finished output items, in order (streaming)
        self._open: dict[str, Any] | None = None  # the item being streamed
        self._sequence = 0

    def add(self, delta: ChoiceDelta) -> None:
        self._text_parts.append(delta.text)
        self.num_completion_tokens += delta.num_tokens
        self.num_cached_tokens += delta.num_cached_tokens
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason

    # ---- whole response -----------------------------------------------------------------

    def final_body(self) -> dict[str, Any]:
        output = parse_chat_output(self.prep.output, "".join(self._text_parts))
        items = []
        if output.reasoning:
            items.append(reasoning_item(_item_id("rs"), output.reasoning, "completed"))
        if output.content:
            items.append(message_item(_item_id("msg"), output.content, "completed"))
        items += [call_item(_item_id("fc"), c.id, c.name, c.arguments, "completed") for c in output.tool_calls]
        if items and self.finish_reason == "length":
            items[-1]["status"] = "incomplete"  # the item the token limit cut
        return self._finished(items)

    def _finished(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        status = "incomplete" if self.finish_reason == "length" else "completed"
        response = self._response(status, items)
        if self.body.store:
            self.record = StoredResponse(self.response_id, response, self.input_items,
                                         self.conversation + [_as_chat_message(items)],
                                         self.session_key or self.response_id)
        return response

    def _response(self, status: str, output: list[dict[str, Any]]) -> dict[str, Any]:
        body = self.body
        reasoning = "".join(c["text"] for i in output if i["type"] == "reasoning" for c in i["content"])
        return {
            "id": self.response_id, "object": "response", "created_at": self.prep.created, "status": status,
            "model": body.model, "output": output, "instructions": body.instructions,
            "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
            "tool_choice": _dump(body.tool_choice) or "auto", "parallel_tool_calls": body.parallel_tool_calls is not False,
            "temperature": body.temperature, "top_p": body.top_p, "max_output_tokens": body.max_output_tokens,
            "previous_response_id": body.previous_response_id, "store": body.store, "metadata": body.metadata or {},
            "prompt_cache_key": body.prompt_cache_key, "prompt_cache_retention": body.prompt_cache_retention,
            "text": {"format": {"type": "text"}}, "truncation": "disabled", "user": body.user, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "usage": self._usage(reasoning) if status != "in_progress" else None,
        }

    def _usage(self, reasoning: str) -> dict[str, Any]:
        prompt_tokens = len(self.prep.prompts[0])
        # Reasoning tokens: the reasoning text re-tokenized (the worker reports no per-part counts).
        reasoning_tokens = len(self.tokenizer.encode(reasoning, add_special_tokens=False)) if reasoning else 0
        return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": self.num_cached_tokens},
                "output_tokens": self.num_completion_tokens,
                "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
                "total_tokens": prompt_tokens + self.num_completion_tokens}

    # ---- streamed events ------------------------------------------------------------------

    def sse_chunks(self, delta: ChoiceDelta) -> list[bytes]:
        events = []
        if self._sequence == 0:
            in_progress = self._response("in_progress", [])
            events += [self._event("response.created", response=in_progress),
                       self._event("response.in_progress", response=in_progress)]
        parsed = self._stream.feed(delta.text, final=delta.finish_reason is not None)
        events += self._item_events(parsed)
        if delta.finish_reason is not None:
            events += self._close("incomplete" if delta.finish_reason == "length" else "completed")
        return events

    def sse_closing(self) -> list[bytes]:
        response = self._finished(self._items)
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        return [self._event(kind, response=response)]

    def sse_error(self, error: dict[str, Any]) -> bytes:
        """The Responses stream's `error` event for a failure after the stream began (`error`:
        the OpenAI error object, {"message", "type", "param", "code"})."""
        return self._event("error", code=error.get("code") or error.get("type"), message=error.get("message"),
                           param=error.get("param"))

    def _item_events(self, parsed: ChatDelta) -> list[bytes]:
        """One delta's events: reasoning, the rest of the call being streamed, text, new calls.
        Text in a delta that continues a call was written after that call (text before a call
        goes out before the call opens), so the call's fragments go first, while it is open."""
        events = []
        if parsed.reasoning:
            events += self._open_item("reasoning") + self._grow("reasoning", parsed.reasoning)
        calls = list(parsed.tool_calls)
        while calls and calls[0].id is None:
            events += self._grow("function_call", calls.pop(0).arguments)
        if parsed.content:
            events += self._open_item("message") + self._grow("message", parsed.content)
        for call in calls:
            if call.id is not None:
                events += self._close() + self._open_call(call.id, call.name)
            else:
                events += self._grow("function_call", call.arguments)
        return events

    def _open_item(self, kind: str) -> list[bytes]:
        if self._open is not None and self._open["type"] == kind:
            return []
        events = self._close()
        if kind == "reasoning":
            self._open = reasoning_item(_item_id("rs"), "", "in_progress")
        else:
            self._open = message_item(_item_id("msg"), "", "in_progress")
        events.append(self._event("response.output_item.added", output_index=len(self._items),
                                  item={**self._open, "content": []}))
        if kind == "message":
            self._open["content"] = [output_text("")]
            events.append(self._event("response.content_part.added", item_id=self._open["id"],
                                      output_index=len(self._items), content_index=0, part=output_text("")))
        return events

    def _open_call(self, call_id: str, name: str) -> list[bytes]:
        self._open = call_item(_item_id("fc"), call_id, name, "", "in_progress")
        return [self._event("response.output_item.added", output_index=len(self._items), item=dict(self._open))]

    def _grow(self, kind: str, text: str) -> list[bytes]:
        item, where = self._open, {"item_id": self._open["id"], "output_index": len(self._items)}
        assert item["type"] == kind, f"a {kind} delta while a {item['type']} item is open"
        if kind == "function_call":
            item["arguments"] += text
            return [self._event("response.function_call_arguments.delta", **where, delta=text)]
        item["content"][0]["text"] += text
        event = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
        extra = {} if kind == "reasoning" else {"logprobs": []}
        return [self._event(event, **where, content_index=0, delta=text, **extra)]

    def _close(self, status: str = "completed") -> list[bytes]:
        item = self._open
        if item is None:
            return []
        self._open = None
        item["status"] = status
        where = {"item_id": item["id"], "output_index": len(self._items)}
        events = []
        if item["type"] == "function_call":
            events.append(self._event("response.function_call_arguments.done", **where, name=item["name"],
                                      arguments=item["arguments"]))
        elif item["type"] == "reasoning":
            events.append(self._event("response.reasoning_text.done", **where, content_index=0,
                                      text=item["content"][0]["text"]))
        else:
            part = item["content"][0]
            events += [self._event("response.output_text.done", **where, content_index=0, text=part["text"],
                                   logprobs=[]),
                       self._event("response.content_part.done", **where, content_index=0, part=part)]
        events.append(self._event("response.output_item.done", output_index=len(self._items), item=item))
        self._items.append(item)
        return events

    def _event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        data = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
        return f"event: {kind}\ndata: {data}\n\n".encode()


def _dump(value: Any) -> Any:
    return value.model_dump() if hasattr(value, "model_dump") else value


def _as_chat_message(items: list[dict[str, Any]]) -> dict[str, Any]:
    """The response's output as the assistant chat message a next turn continues from."""
    text = "".join(c["text"] for i in items if i["type"] == "message" for c in i["content"])
    calls = [{"id": i["call_id"], "type": "function", "function": {"name": i["name"], "arguments": i["arguments"]}}
             for i in items if i["type"] == "function_call"]
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = calls
    return message
