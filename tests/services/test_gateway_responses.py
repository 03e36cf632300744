"""The Responses API (`POST /v1/responses`) through the real gateway and the `openai` client, in
front of the scripted tool-calling worker (scripted_tools.py); and the OpenAI Agents SDK's default
model class, which speaks this API, running a two-turn tool loop. Streams of chosen deltas (a
forced call cut off by max_output_tokens, a failure mid-stream) drive the builder itself."""

from __future__ import annotations

import json

import httpx
import pytest

from scripted_tools import ANSWER, MODEL, client as make_client, run_weather_agent
from splitserve.services.gateway.chat_output import OutputSpec
from splitserve.services.gateway.completion import ChoiceDelta
from splitserve.services.gateway.prepare import PreparedRequest
from splitserve.services.gateway.responses_output import ResponsesBuilder
from splitserve.services.gateway.responses_protocol import ResponsesRequest
from splitserve.services.gateway.tool_parsers import TOOL_PARSERS
from splitserve.services.gateway.tool_parsers.forced import RequiredCallsParser
from splitserve.shared.sampling_params import SamplingParams

TOOLS = [{"type": "function", "name": "get_weather", "description": "Current weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
ASK = "What is the weather in Paris?"


def _prompt(worker, tokenizer) -> str:
    return tokenizer.decode(list(worker.record.generates[-1].prompt_token_ids))


def test_text_input_and_instructions(scripted_stack):
    gateway, worker, tokenizer = scripted_stack
    response = make_client(gateway).responses.create(model=MODEL, input=ASK, instructions="Be brief.")
    prompt = _prompt(worker, tokenizer)
    assert "<|system|>\nBe brief.<|end|>" in prompt and ASK in prompt
    assert response.status == "completed" and response.id.startswith("resp_")
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.output[0].content[0].text == "\nThe user wants weather.\n"
    assert "<tool_call>" in response.output_text  # no tools offered: no call is read
    assert response.usage.input_tokens == len(worker.record.generates[-1].prompt_token_ids)
    assert response.usage.output_tokens > 0 and response.usage.output_tokens_details.reasoning_tokens > 0


def test_function_call_then_output_through_previous_response_id(scripted_stack):
    gateway, worker, tokenizer = scripted_stack
    client = make_client(gateway)
    first = client.responses.create(model=MODEL, input=[{"role": "user", "content": ASK}], tools=TOOLS)
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"} and call.call_id
    assert first.output[1].type == "message" and first.output[1].content[0].text == "\n\nLet me check.\n"
    second = client.responses.create(model=MODEL, previous_response_id=first.id, tools=TOOLS, input=[
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}])
    prompt = _prompt(worker, tokenizer)
    assert ASK in prompt and '"arguments": {"city": "Paris"}' in prompt and "sunny, 21 C" in prompt
    assert second.output_text == ANSWER and second.previous_response_id == first.id


def test_streamed_events(scripted_stack):
    gateway, _, _ = scripted_stack
    with make_client(gateway).responses.stream(model=MODEL, input=ASK, tools=TOOLS) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    for kind in ("response.reasoning_text.delta", "response.output_text.delta", "response.function_call_arguments.delta",
                 "response.function_call_arguments.done", "response.output_item.done"):
        assert kind in kinds, kind
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert json.loads(arguments) == {"city": "Paris"}
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "\n\nLet me check.\n"
    assert [i.type for i in final.output] == ["reasoning", "message", "function_call"]
    assert final.output[2].name == "get_weather" and final.output[2].arguments == arguments


@pytest.mark.parametrize("body,status,param", [
    ({"input": ASK, "background": True}, 400, "background"),
    ({"input": ASK, "tools": [{"type": "web_search"}]}, 400, "tools[0].type"),
    ({"input": ASK, "previous_response_id": "resp_unknown"}, 404, "previous_response_id"),
    ({"input": ASK, "include": ["reasoning.encrypted_content"]}, 400, "include"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, 400, None),
    ({"input": ASK, "tools": TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, 400, "tool_choice"),
    ({"input": ASK, "text": {"verbosity": "low"}}, 400, "text.verbosity"),
    ({"input": ASK, "text": {"format": {"type": "text", "strict": True}}}, 400, "text.format.strict"),
])
def test_bad_requests(scripted_stack, body, status, param):
    gateway, _, _ = scripted_stack
    resp = httpx.post(f"{gateway.url}/v1/responses", json={"model": MODEL, **body}, timeout=10)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["message"] and (param is None or error["param"] == param), error
    assert make_client(gateway).responses.create(model=MODEL, input=ASK).status == "completed"


def test_store_false_is_not_kept(scripted_stack):
    gateway, _, _ = scripted_stack
    client = make_client(gateway)
    response = client.responses.create(model=MODEL, input=ASK, store=False)
    resp = httpx.post(f"{gateway.url}/v1/responses", timeout=10,
                      json={"model": MODEL, "input": "more", "previous_response_id": response.id})
    assert resp.status_code == 404


@pytest.mark.parametrize("streamed", [False, True])
def test_agents_sdk_loop_over_the_responses_api(scripted_stack, streamed):
    from agents import OpenAIResponsesModel

    run_weather_agent(scripted_stack, OpenAIResponsesModel, streamed)


def _builder(parser, stream: bool) -> ResponsesBuilder:
    body = ResponsesRequest(model=MODEL, input=ASK, tools=TOOLS, stream=stream, store=False)
    prep = PreparedRequest("chat", "chatcmpl-test", MODEL, [[1, 2]], SamplingParams(), stream, False,
                           output=OutputSpec(parser))
    return ResponsesBuilder(prep, body, [], [], None, tokenizer=None)


def _events(chunks: list[bytes]) -> list[dict]:
    """The typed events of SSE chunks, each checked to name its type on its `event:` line."""
    events = []
    for chunk in chunks:
        kind, data = chunk.decode().removesuffix("\n\n").split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert kind == f"event: {event['type']}", chunk
        events.append(event)
    return events


def _streamed(parser, deltas: list[ChoiceDelta]) -> list[dict]:
    builder, chunks = _builder(parser, stream=True), []
    for delta in deltas:
        builder.add(delta)
        chunks += builder.sse_chunks(delta)
    return _events(chunks + builder.sse_closing())


def _without_ids(items: list[dict]) -> list[dict]:
    return [{k: v for k, v in item.items() if k not in ("id", "call_id")} for item in items]


@pytest.mark.parametrize("text,arguments", [
    ('[{"name": "get_weather", "parameters": {"city": "Par', '{"city": "Par'),
    ('[{"name": "get_weather", ', ""),
    ('[{"na', None)])  # cut before the name: no call, no content
def test_forced_call_cut_off_by_max_output_tokens_is_the_same_call_streamed_and_whole(text, arguments):
    """A function_call item with the arguments written so far, marked incomplete, in a response
    that is incomplete (max_output_tokens), closed by response.incomplete after the item's done
    events; never the grammar's wrapper as output_text."""
    deltas = [ChoiceDelta(0, ch, 1, finish_reason="length" if k == len(text) - 1 else None)
              for k, ch in enumerate(text)]  # one delta per character
    whole = _builder(RequiredCallsParser, stream=False)
    for delta in deltas:
        whole.add(delta)
    body = whole.final_body()
    events = _streamed(RequiredCallsParser, deltas)
    final = events[-1]["response"]
    expected = ([{"type": "function_call", "name": "get_weather", "arguments": arguments, "status": "incomplete"}]
                if arguments is not None else [])
    assert _without_ids(body["output"]) == _without_ids(final["output"]) == expected
    for response in (body, final):
        assert response["status"] == "incomplete" and response["incomplete_details"] == {"reason": "max_output_tokens"}
    kinds = [e["type"] for e in events]
    closing = ["response.function_call_arguments.done", "response.output_item.done"] if expected else []
    assert kinds[-len(closing) - 1:] == [*closing, "response.incomplete"] and "error" not in kinds
    streamed = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
    assert streamed == (arguments or "")
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


def test_a_calls_last_fragment_and_the_text_after_it_in_one_delta():
    """The rest of a streamed call and text after it arrive together (hermes): the fragment goes
    to the call, then the text opens a message."""
    deltas = [ChoiceDelta(0, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa', 1),
              ChoiceDelta(0, 'ris"}}\n</tool_call> Done.', 1, finish_reason="stop")]
    events = _streamed(TOOL_PARSERS["hermes"], deltas)
    output = events[-1]["response"]["output"]
    assert events[-1]["type"] == "response.completed"
    assert [(i["type"], i.get("arguments"), i["status"]) for i in output] == [
        ("function_call", '{"city": "Paris"}', "completed"), ("message", None, "completed")]
    assert output[1]["content"][0]["text"] == " Done."


def test_a_failure_inside_a_stream_is_a_typed_error_event():
    """After the stream began, a failure (here the worker's stream) ends it with the Responses
    API's `error` event (OpenAI's shape, an `event:` line, the next sequence number)."""
    import asyncio

    from splitserve.services.gateway.app import _sse_events
    from splitserve.services.gateway.responses_routes import _kept_before_next

    async def worker_stream():
        yield ChoiceDelta(0, "Hel", 1)
        raise RuntimeError("the worker went away")

    async def run():
        builder = _builder(None, stream=True)
        events = _sse_events(None, builder.prep, builder, [worker_stream()])
        return [chunk async for chunk in _kept_before_next(events, builder, store=None)]

    chunks = asyncio.run(run())
    assert chunks[-1] == b"data: [DONE]\n\n"
    events = _events(chunks[:-1])
    assert [e["type"] for e in events][-2:] == ["response.output_text.delta", "error"]
    assert events[-1] == {"type": "error", "sequence_number": len(events) - 1, "code": "internal_error",
                          "message": "internal error: RuntimeError", "param": None}
