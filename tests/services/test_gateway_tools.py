"""Tool calling and reasoning through the real gateway (uvicorn, HTTP, the `openai` client, the
OpenAI Agents SDK) in front of a SCRIPTED worker that answers with a chosen model output.

The worker is a real gRPC server replaying tokens of a Hermes-format tool call (or, once the prompt
holds the tool's result, a final answer): what is under test is that tools reach the prompt through
the chat template and that the gateway reads the call back in OpenAI's shapes, whole and streamed.
"""

from __future__ import annotations

import copy
import json

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings, strategies as st

from checkpoints import demo_tokenizer
from scripted_tools import (ALARM, ALARM_CALL, ANSWER, ASK, MODEL, TOOLS, client as _client, run_weather_agent,
                           tool_stack)
from splitserve.services.gateway.app import build_app
from splitserve.services.gateway.config import AgentApiConfig, GatewayConfig


def _last_prompt(worker, tokenizer) -> str:
    return tokenizer.decode(list(worker.record.generates[-1].prompt_token_ids))


def test_tools_and_tool_results_reach_the_prompt(scripted_stack):
    gateway, worker, tokenizer = scripted_stack
    client = _client(gateway)
    client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS)
    prompt = _last_prompt(worker, tokenizer)
    assert "<tools>" in prompt and '"name": "get_weather"' in prompt and "Current weather of a city" in prompt
    assert '"required": ["city"]' in prompt
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    reply = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS)
    prompt = _last_prompt(worker, tokenizer)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in prompt
    assert reply.choices[0].message.content == ANSWER and reply.choices[0].finish_reason == "stop"


def test_whole_response_carries_tool_calls_and_reasoning(scripted_stack):
    gateway, _, _ = scripted_stack
    reply = _client(gateway).chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "\n\nLet me check.\n"
    assert choice.message.model_extra["reasoning_content"] == "\nThe user wants weather.\n"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_streamed_tool_calls_assemble_in_the_openai_stream_helper(scripted_stack):
    gateway, _, _ = scripted_stack
    with _client(gateway).chat.completions.stream(model=MODEL, messages=ASK, tools=TOOLS) as stream:
        chunks = [event.chunk for event in stream if event.type == "chunk"]
        final = stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert final.choices[0].finish_reason == "tool_calls"
    call_deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert call_deltas[0].id and call_deltas[0].function.name == "get_weather"
    assert len(call_deltas) >= 2 and all(d.id is None and d.function.name is None for d in call_deltas[1:])
    reasoning = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks if c.choices)
    assert reasoning == "\nThe user wants weather.\n"


def test_parallel_calls_and_parallel_tool_calls_false(scripted_stack):
    gateway, _, _ = scripted_stack
    tools = [*TOOLS, {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    client = _client(gateway)
    both = client.chat.completions.create(model=MODEL, messages=ASK, tools=tools).choices[0].message.tool_calls
    assert [c.function.name for c in both] == ["get_weather", "get_time"] and both[0].id != both[1].id
    one = client.chat.completions.create(model=MODEL, messages=ASK, tools=tools, parallel_tool_calls=False)
    assert [c.function.name for c in one.choices[0].message.tool_calls] == ["get_weather"]


def test_tool_choice_none_reads_no_calls(scripted_stack):
    gateway, _, _ = scripted_stack
    reply = _client(gateway).chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none")
    assert reply.choices[0].message.tool_calls is None and "<tool_call>" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("change,param", [
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "messages": [*ASK, {"role": "tool", "content": "sunny"}]}, "messages.1.tool_call_id"),
])
def test_bad_tool_requests_are_400_and_the_stack_keeps_serving(scripted_stack, change, param):
    gateway, _, _ = scripted_stack
    body = {"model": MODEL, "messages": ASK, **change}
    resp = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=10)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    assert _client(gateway).chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS).choices[0].message.tool_calls


def _offline_app(tokenizer, agent_api: AgentApiConfig) -> TestClient:
    config = GatewayConfig(model_dir="/nonexistent", served_model_name=MODEL, worker_urls=("127.0.0.1:9",),
                           max_model_len=512, load_rpc_timeout_s=0.5, agent_api=agent_api)
    return TestClient(build_app(config, tokenizer=tokenizer), raise_server_exceptions=False)


def test_auto_tool_choice_needs_the_flag_and_templates_must_render_tools():
    body = {"model": MODEL, "messages": ASK, "tools": TOOLS}
    with _offline_app(demo_tokenizer(), AgentApiConfig()) as client:
        resp = client.post("/v1/chat/completions", json=body)
        assert resp.status_code == 400 and "--enable-auto-tool-choice" in resp.json()["error"]["message"]
    plain = copy.deepcopy(demo_tokenizer())
    plain.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with _offline_app(plain, AgentApiConfig(enable_auto_tool_choice=True, tool_call_parser="hermes")) as client:
        resp = client.post("/v1/chat/completions", json=body)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "tools"
        assert "does not render tools" in resp.json()["error"]["message"]


@pytest.mark.parametrize("streamed", [False, True])
def test_agents_sdk_loop_over_chat_completions(scripted_stack, streamed):
    """Two model turns: the agent calls get_weather, sends the result back, gets the answer."""
    from agents import OpenAIChatCompletionsModel

    prompt = run_weather_agent(scripted_stack, OpenAIChatCompletionsModel, streamed)
    assert "Answer weather questions." in prompt


@pytest.fixture(scope="module")
def offline_client():
    with _offline_app(demo_tokenizer(), AgentApiConfig(enable_auto_tool_choice=True, tool_call_parser="hermes")) as c:
        yield c


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.text(max_size=8))
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(
        ["type", "function", "name", "arguments", "parameters", "role", "content", "tool_calls", "tool_call_id",
         "call_id", "output", "id", "text"]), inner, max_size=4)), max_leaves=10)
_near_valid = st.one_of(_values, st.just(TOOLS), st.just([{"type": "function", "function": {"name": "f"}}]),
                        st.just({"type": "function", "function": {"name": "get_weather"}}), st.just("required"))
_CHAT_KEYS = ["tools", "tool_choice", "parallel_tool_calls", "messages"]
_RESPONSES_KEYS = ["input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "previous_response_id",
                   "include", "max_output_tokens", "store", "text", "truncation", "metadata"]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=st.dictionaries(st.sampled_from(_CHAT_KEYS + _RESPONSES_KEYS), _near_valid, max_size=4),
       responses=st.booleans())
def test_random_tool_fields_never_give_a_500(offline_client, fields, responses):
    body = {"model": MODEL, **({"input": "hi"} if responses else {"messages": ASK}), **fields}
    path = "/v1/responses" if responses else "/v1/chat/completions"
    resp = offline_client.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    assert resp.status_code in (400, 404, 503), (resp.status_code, resp.text)
    assert resp.json()["error"]["message"]


def test_mistral_parser_reads_special_token_markers_and_hides_the_eos():
    """[TOOL_CALLS] is a special token in Mistral's tokenizer, so the parser's text keeps special
    tokens; the EOS that ends the output must still not show up as content."""
    mistral = '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}'

    def reply(tokenizer):
        return lambda prompt: tokenizer.encode(mistral, add_special_tokens=False) + [tokenizer.eos_token_id]

    with tool_stack(reply, tool_call_parser="mistral", reasoning_parser=None) as (gateway, _, _):
        choice = _client(gateway).chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS).choices[0]
    (call,) = choice.message.tool_calls
    assert choice.message.content is None and choice.finish_reason == "tool_calls"
    assert call.function.name == "get_weather" and len(call.id) == 9


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_calls_need_structured_outputs(offline_client, choice):
    """Until the grammar-constrained sampler is in this build, forcing a call is refused by name
    (never run unconstrained and silently ignored)."""
    resp = offline_client.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, "tools": TOOLS,
                                                             "tool_choice": choice})
    try:
        from splitserve.shared.sampling_params import StructuredOutputsParams  # noqa: F401
    except ImportError:
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "tool_choice"
        assert "structured outputs" in resp.json()["error"]["message"]
    else:
        assert resp.status_code == 503  # accepted; no worker behind the offline app


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_forced_call_with_its_own_output_constraint_is_a_400(offline_client, choice):
    """Two grammars for the same tokens (the forced call's schema and vLLM's structured_outputs)
    are refused by name, not one of them silently dropped."""
    resp = offline_client.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, "tools": TOOLS,
                                                             "tool_choice": choice, "structured_outputs": {"regex": "a+"}})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "structured_outputs", resp.text
    assert "tool_choice" in resp.json()["error"]["message"]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_forced_call_with_a_response_format_is_served(offline_client, choice):
    """OpenAI accepts the pair (an Agents SDK agent with an output type may force a tool): the
    forced call shapes the output, and response_format, which shapes text replies, has none."""
    resp = offline_client.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, "tools": TOOLS,
                                                             "tool_choice": choice,
                                                             "response_format": {"type": "json_object"}})
    assert resp.status_code == 503, resp.text  # accepted; no worker behind the offline app


def test_forced_call_cut_off_by_max_tokens_over_both_apis(scripted_stack):
    """The same call, with the same unfinished arguments, whole and streamed, from chat completions
    (finish_reason length) and the Responses API (an incomplete function_call in an incomplete
    response); the grammar's `[{"name": ...` wrapper never shows as content."""
    gateway, _, tokenizer = scripted_stack
    client = _client(gateway)
    max_tokens = len(tokenizer.encode(ALARM_CALL[:ALARM_CALL.index("07")], add_special_tokens=False)) + 1
    chat = dict(model=MODEL, messages=ASK, tools=[ALARM], tool_choice="required", max_tokens=max_tokens)
    whole = client.chat.completions.create(**chat).choices[0]
    (call,) = whole.message.tool_calls
    assert whole.finish_reason == "length" and not whole.message.content and call.function.name == "set_alarm"
    arguments = call.function.arguments
    assert arguments.startswith('{"time": "') and '{"time": "07:30", "label": "wake up"}'.startswith(arguments)
    chunks = list(client.chat.completions.create(**chat, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""
    assert "".join(d.function.arguments or "" for c in chunks for d in c.choices[0].delta.tool_calls or []) == arguments
    assert chunks[-1].choices[0].finish_reason == "length"
    responses = dict(model=MODEL, input=ASK[0]["content"], tools=[{"type": "function", **ALARM["function"]}],
                     tool_choice="required", max_output_tokens=max_tokens)
    events = list(client.responses.create(**responses, stream=True))
    assert events[-1].type == "response.incomplete"
    for response in (client.responses.create(**responses), events[-1].response):
        (item,) = response.output
        assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
        assert (item.type, item.name, item.arguments, item.status) == ("function_call", "set_alarm", arguments,
                                                                       "incomplete")


def test_a_cut_off_call_sent_back_reaches_the_template_as_its_string(scripted_stack):
    """A forced call cut by max_tokens has arguments that are not JSON; an agent loop sends that
    message back as it got it (the Agents SDK does), so the next turn is served, not a 400."""
    gateway, worker, tokenizer = scripted_stack
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Par'}}]},
        {"role": "tool", "tool_call_id": "c", "content": "cut off"}]
    reply = _client(gateway).chat.completions.create(model=MODEL, messages=history, tools=TOOLS)
    assert reply.choices[0].message.content == ANSWER
    assert '"arguments": "{\\"city\\": \\"Par"' in _last_prompt(worker, tokenizer)
