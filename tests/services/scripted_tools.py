"""A real gateway (hermes tool parser, qwen3 reasoning parser) in front of a SCRIPTED worker that
answers like a tool-calling model: a reasoning block, a sentence and a Hermes call, until the prompt
holds a tool result, then the answer. Used by the tool-calling and Responses API tests, which
share one such stack (tests/services/conftest.py) and the Agents SDK loop over it."""

from __future__ import annotations

import asyncio
import contextlib

from checkpoints import demo_tokenizer
from scripted_worker import BackgroundLoop, GatewayServer, Script, start_scripted_worker, stop_scripted_worker
from splitserve.services.gateway.app import build_app
from splitserve.services.gateway.config import AgentApiConfig, GatewayConfig

MODEL = "splitserve-demo"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
ANSWER = "It is sunny in Paris."
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
ALARM = {"type": "function", "function": {"name": "set_alarm", "parameters": {
    "type": "object", "properties": {"time": {"type": "string"}, "label": {"type": "string"}}}}}
ALARM_CALL = '[{"name": "set_alarm", "parameters": {"time": "07:30", "label": "wake up"}}]'
"""What a forced call (tool_choice "required") to ALARM looks like: the grammar's shape."""


def _reply(tokenizer):
    """The scripted model: a call (after a reasoning block and a sentence) until the prompt holds a
    tool result, then the answer; with ALARM offered, ALARM_CALL."""
    def reply(prompt: list[int]) -> list[int]:
        prompt_text = tokenizer.decode(prompt)
        if "<tool_response>" in prompt_text:
            return tokenizer.encode(ANSWER, add_special_tokens=False)
        if "set_alarm" in prompt_text:
            return tokenizer.encode(ALARM_CALL, add_special_tokens=False)
        if "get_time" in prompt_text:  # two tools offered: call both
            two = CALL + "\n" + CALL.replace("get_weather", "get_time").replace('"city": "Paris"', '"tz": "CET"')
            return tokenizer.encode(two, add_special_tokens=False)
        return tokenizer.encode("<think>\nThe user wants weather.\n</think>\n\nLet me check.\n" + CALL,
                                add_special_tokens=False)
    return reply


@contextlib.contextmanager
def tool_stack(reply=None, **agent_api):
    """`reply(tokenizer)` -> the scripted model (default: Hermes calls); `agent_api` overrides."""
    tokenizer = demo_tokenizer()
    loop = BackgroundLoop()
    worker, url = loop.call(lambda: start_scripted_worker(
        "colocated", Script(tokens=[1], reply=(reply or _reply)(tokenizer), max_model_len=2048), "w0"))
    config = GatewayConfig(model_dir="/nonexistent", served_model_name=MODEL, worker_urls=(url,),
                           load_poll_interval_s=0.1, load_rpc_timeout_s=0.5,
                           agent_api=AgentApiConfig(**{"enable_auto_tool_choice": True, "tool_call_parser": "hermes",
                                                       "reasoning_parser": "qwen3", **agent_api}))
    gateway = GatewayServer(loop, build_app(config, tokenizer=tokenizer))
    try:
        yield gateway, worker, tokenizer
    finally:
        gateway.stop()
        loop.call(lambda: stop_scripted_worker(worker))
        loop.close()


def client(gateway, cls=None):
    from openai import OpenAI
    return (cls or OpenAI)(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)




def run_weather_agent(stack, model_class, streamed: bool) -> str:
    """The OpenAI Agents SDK's loop over `stack` (tool_stack's parts) with `model_class` (its Chat
    Completions or Responses model): two model turns, the agent calls get_weather, sends the result
    back and gets the answer. Checks that loop and returns the last prompt the worker saw."""
    from agents import Agent, Runner, function_tool, set_tracing_disabled
    from openai import AsyncOpenAI

    gateway, worker, tokenizer = stack
    set_tracing_disabled(True)
    cities = []

    @function_tool
    def get_weather(city: str) -> str:
        """Current weather of a city."""
        cities.append(city)
        return f"sunny in {city}"

    async def run():
        agent = Agent(name="weather", instructions="Answer weather questions.", tools=[get_weather],
                      model=model_class(model=MODEL, openai_client=client(gateway, AsyncOpenAI)))
        if not streamed:
            return await Runner.run(agent, ASK[0]["content"], max_turns=4)
        result = Runner.run_streamed(agent, ASK[0]["content"], max_turns=4)
        async for _ in result.stream_events():
            pass
        return result

    before = len(worker.record.generates)
    result = asyncio.run(run())
    assert result.final_output == ANSWER and cities == ["Paris"]
    assert len(worker.record.generates) - before == 2
    prompt = tokenizer.decode(list(worker.record.generates[-1].prompt_token_ids))
    assert "<tool_response>\nsunny in Paris\n</tool_response>" in prompt
    return prompt
