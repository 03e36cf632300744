"""The Responses API (`POST /v1/responses`) through the real gateway and the `openai` client, in
front of the scripted tool-calling worker (scripted_tools.py); and the OpenAI Agents SDK's default
model class, which speaks this API, running a two-turn tool loop."""

from __future__ import annotations

import json

import httpx
import pytest

from scripted_tools import ANSWER, MODEL, client as make_client, run_weather_agent

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
