"""Tools, reasoning parsing and the Responses API against the real `splitserve up` (gateway,
prefill and decode processes) serving the demo checkpoint, through the `openai` client.

The demo model's random weights will not write a tool call on their own; what is checked here is
that the tools reach the prompt (usage equals the chat template rendered with the tools), that the
parsers and both APIs hold up on real model output, and that bad input gets 400s while the stack
keeps serving. The agent loops run in test_gateway_tools.py / test_gateway_responses.py.
"""

from __future__ import annotations

from typing import Literal  # module level: the SDK resolves the tool's annotations in these globals

import httpx
import pytest

from checkpoints import demo_tokenizer
from splitserve.shared.tokenizer import apply_chat_template

pytestmark = pytest.mark.slow

MODEL = "splitserve-demo"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def disagg(agent_api_stack):
    return agent_api_stack  # gateway, prefill, decode; the tool and reasoning parsers on (conftest.py)


def test_tools_reach_the_prompt_and_the_output_is_read(disagg):
    client = disagg.openai()
    with_tools = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=12, temperature=0)
    expected = apply_chat_template(demo_tokenizer(), ASK, tools=TOOLS)
    assert with_tools.usage.prompt_tokens == len(expected)
    plain = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=12, temperature=0)
    assert plain.usage.prompt_tokens == len(apply_chat_template(demo_tokenizer(), ASK)) < len(expected)
    choice = with_tools.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.message.tool_calls is None
    assert choice.message.content  # the demo model writes text, which stays content


def test_streamed_chat_with_tools_and_responses_api(disagg):
    client = disagg.openai()
    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=12,
                                                 temperature=0, stream=True))
    whole = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=12, temperature=0)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    response = client.responses.create(model=MODEL, input="What is the weather in Paris?", max_output_tokens=12,
                                       temperature=0, tools=[{"type": "function", **TOOLS[0]["function"]}])
    assert response.status in ("completed", "incomplete") and response.output_text == whole.choices[0].message.content
    assert response.usage.input_tokens == whole.usage.prompt_tokens


def test_bad_tool_input_is_400_and_the_stack_keeps_serving(disagg):
    for path, body in (
            ("/v1/chat/completions", {"messages": ASK, "tools": [{"type": "code_interpreter"}]}),
            ("/v1/chat/completions", {"messages": ASK, "tools": TOOLS,
                                      "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            ("/v1/chat/completions", {"messages": [*ASK, {"role": "tool", "content": "x"}], "tools": TOOLS}),
            ("/v1/responses", {"input": "hi", "tools": [{"type": "file_search"}]}),
            ("/v1/responses", {"input": "hi", "previous_response_id": "resp_nope"})):
        resp = httpx.post(f"{disagg.url}{path}", json={"model": MODEL, **body}, timeout=30)
        assert resp.status_code in (400, 404), resp.text
        assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
    ok = disagg.openai().chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=4)
    assert ok.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_agents_sdk_loop_with_a_forced_call_on_the_real_stack(disagg, api):
    """Turn 1 forces a call (tool_choice required: the grammar makes even the random demo model
    write one that fits the schema); the SDK runs the tool, sends the result back and resets
    tool_choice, so turn 2 answers in text."""
    import asyncio

    from agents import (Agent, ModelSettings, OpenAIChatCompletionsModel, OpenAIResponsesModel, Runner,
                        function_tool, set_tracing_disabled)

    set_tracing_disabled(True)
    cities = []

    @function_tool
    def get_weather(city: Literal["Paris", "Rome"]) -> str:  # an enum: the forced call stays short
        """Current weather of a city."""
        cities.append(city)
        return f"sunny in {city}"

    model_class = OpenAIChatCompletionsModel if api == "chat" else OpenAIResponsesModel
    # Over /v1/responses the SDK raises on `response.incomplete`, which the random model's free-text
    # second turn always is (it runs to max_output_tokens): there the run stops at the tool's result.
    behavior = "run_llm_again" if api == "chat" else "stop_on_first_tool"
    agent = Agent(name="weather", tools=[get_weather], model=model_class(model=MODEL, openai_client=disagg.async_openai()),
                  model_settings=ModelSettings(tool_choice="required", max_tokens=64, temperature=0),
                  tool_use_behavior=behavior)
    result = asyncio.run(Runner.run(agent, "What is the weather in Paris?", max_turns=3))
    assert len(cities) == 1 and cities[0] in ("Paris", "Rome")
    assert isinstance(result.final_output, str)
