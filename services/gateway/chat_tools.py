"""Tools in a chat request: checks, what the chat template gets, and how the output is read.

    tool_choice   output read by                          decoding
    none          no parser (a call is plain content)     free
    auto          --tool-call-parser (needs --enable-auto-tool-choice)   free; with a strict tool,
                                                          calls held to their schemas (strict_calls_spec)
    required      RequiredCallsParser                     constrained to forced_call_schema
    named         NamedCallParser (output = arguments)    constrained to the tool's parameters

A forced call decides the output's shape: the request's response_format, which OpenAI applies to a
text reply, has none to apply to (accepted, as OpenAI and vLLM do, so an Agents SDK agent with an
output type may force a tool); vLLM's structured_outputs beside it is a 400 (two grammars for the
same tokens). A forced output cut off by max_tokens is read as the calls it got to (forced.py).

Forcing a call relies on structured outputs (the grammar-constrained sampler): the JSON schema
of the call goes to the workers as the request's `structured_outputs`, as vLLM does it.

`strict: true` on a tool: with `required` or a named function the arguments are decoded under the
tool's schema anyway, strict or not (OpenAI's strict guarantee). With `auto`, the text stays free
until the parser's call marker (`<tool_call>` for hermes); from there the call must be one of the
tools, with a strict tool's arguments held to its `parameters` (the others' to any JSON object),
through xgrammar's structural tag. A parser with no such marker (llama3_json, mistral) and a
request with its own response_format / structured_outputs (which is kept) leave auto calls free.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Callable

from splitserve.services.gateway.config import AgentApiConfig
from splitserve.services.gateway.openai_protocol import bad_request
from splitserve.services.gateway.request_models import ChatCompletionRequest, ChatMessage
from splitserve.services.gateway.tool_parsers import TOOL_PARSERS, ToolParser
from splitserve.services.gateway.tool_parsers.forced import NamedCallParser, RequiredCallsParser
from splitserve.shared.sampling_params import SamplingParams
from splitserve.shared.structured_outputs import StructuredOutputsParams

_PROBE_TOOL = {"type": "function", "function": {"name": "splitserve_probe_tool", "description": "probe",
                                                "parameters": {"type": "object", "properties": {}}}}


@dataclass
class ToolUse:
    """What a request's tools mean for its prompt and its output."""

    mode: str  # "none" | "auto" | "required" | "named"
    tools: list[dict[str, Any]]  # OpenAI's tool objects, as chat templates expect them
    parser: Callable[[], ToolParser] | None = None
    max_calls: int | None = None
    constraint: StructuredOutputsParams | None = None  # how decoding is constrained, if it is


def resolve_tool_use(body: ChatCompletionRequest, config: AgentApiConfig) -> ToolUse:
    tools = _function_tools(body)
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    if not tools:
        if choice != "none":
            raise bad_request("tool_choice needs tools", "tool_choice")
        return ToolUse("none", [])
    max_calls = 1 if body.parallel_tool_calls is False else None
    if choice == "none":
        return ToolUse("none", tools)
    if choice == "auto":
        if not config.enable_auto_tool_choice:
            raise bad_request('"auto" tool choice needs the gateway started with --enable-auto-tool-choice '
                              "--tool-call-parser NAME", "tool_choice")
        parser = TOOL_PARSERS[config.tool_call_parser]
        return ToolUse("auto", tools, parser, max_calls, strict_calls_spec(tools, parser, max_calls))
    _check_no_output_constraint(body, choice)
    if choice == "required":
        return ToolUse("required", tools, RequiredCallsParser, max_calls,
                       StructuredOutputsParams(json=forced_call_schema(tools, max_calls)))
    name = choice.function.name
    tool = next((t for t in tools if t["function"]["name"] == name), None)
    if tool is None:
        raise bad_request(f"tool_choice names the function {name!r}, which is not among the tools", "tool_choice")
    return ToolUse("named", tools, lambda: NamedCallParser(name), 1, StructuredOutputsParams(json=_parameters(tool)))


def _check_no_output_constraint(body: ChatCompletionRequest, choice: Any) -> None:
    """A forced call IS an output constraint (the calls' schema): vLLM's explicit decoding
    constraint beside it is refused rather than one of the two silently dropped. response_format
    is not: it shapes a text reply, and a forced call has none (OpenAI accepts the pair)."""
    forced = '"required"' if choice == "required" else "naming a function"
    if body.structured_outputs is not None:
        raise bad_request(f"structured_outputs cannot be combined with tool_choice {forced}: the forced call "
                          "already fixes the output's shape", "structured_outputs")


def _function_tools(body: ChatCompletionRequest) -> list[dict[str, Any]]:
    tools = []
    for i, tool in enumerate(body.tools or []):
        if tool.type != "function":
            raise bad_request(f"tools[{i}].type {tool.type!r} is not supported; only \"function\" tools are",
                              f"tools[{i}].type")
        if tool.function is None:
            raise bad_request(f"tools[{i}].function is required", f"tools[{i}].function")
        tools.append({"type": "function", "function": tool.function.model_dump(exclude_none=True)})
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise bad_request("tool function names must be unique", "tools")
    return tools


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def forced_call_schema(tools: list[dict[str, Any]], max_calls: int | None) -> dict[str, Any]:
    """JSON schema of `[{"name": <a tool>, "parameters": <its arguments>}, ...]` (at least one call)."""
    calls = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                                               "parameters": _parameters(t)},
              "required": ["name", "parameters"]} for t in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if max_calls is not None:
        schema["maxItems"] = max_calls
    return schema


def strict_calls_spec(tools: list[dict[str, Any]], parser: type[ToolParser],
                      max_calls: int | None) -> StructuredOutputsParams | None:
    """Free text whose calls (from the parser's trigger on) name a tool and hold a strict tool's
    arguments to its schema; None when no tool is strict or the parser has no trigger."""
    if parser.call_trigger is None or not any(t["function"].get("strict") for t in tools):
        return None
    tags = []
    for tool in tools:
        begin, end = parser.call_tag(tool["function"]["name"])
        schema = _parameters(tool) if tool["function"].get("strict") else {"type": "object"}
        tags.append({"begin": begin, "content": {"type": "json_schema", "json_schema": schema}, "end": end})
    spec = {"type": "structural_tag", "format": {
        "type": "triggered_tags", "triggers": [parser.call_trigger], "tags": tags,
        "at_least_one": False, "stop_after_first": max_calls == 1}}
    return StructuredOutputsParams(structural_tag=json.dumps(spec, separators=(",", ":")))


def constrained(params: SamplingParams, use: ToolUse) -> SamplingParams:
    """`params` with decoding constrained by `use` (structured outputs), if it is. Auto mode's
    strict calls give way to the request's own structured outputs."""
    if use.constraint is None or (use.mode == "auto" and params.structured_outputs is not None):
        return params
    return dataclasses.replace(params, structured_outputs=use.constraint)


# ---- what the chat template gets --------------------------------------------------------------

def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI messages as chat templates expect them (tool call arguments as objects, as in HF)."""
    out = []
    for i, message in enumerate(messages):
        entry: dict[str, Any] = {"role": message.role, "content": message.text()}
        if message.role == "developer":
            entry["role"] = "system"  # templates know system, not OpenAI's newer name for it
        if message.role == "tool":
            if not message.tool_call_id:
                raise bad_request(f"messages[{i}]: a tool message needs tool_call_id", f"messages.{i}.tool_call_id")
            entry["tool_call_id"] = message.tool_call_id
        if message.tool_calls:
            if message.role != "assistant":
                raise bad_request(f"messages[{i}]: only assistant messages carry tool_calls", f"messages.{i}.tool_calls")
            entry["tool_calls"] = [_template_call(call) for call in message.tool_calls]
        if message.name:
            entry["name"] = message.name
        out.append(entry)
    return out


def _template_call(call) -> dict[str, Any]:
    """Arguments as an object, as HF templates expect; arguments that are not JSON (a call cut off
    by max_tokens, sent back as this server returned it) stay the string OpenAI treats them as,
    which templates render as is or as a JSON string."""
    try:
        arguments = json.loads(call.function.arguments or "{}")
    except ValueError:
        arguments = call.function.arguments
    return {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": arguments}}


def check_template_renders_tools(tokenizer: Any) -> None:
    """400 unless the chat template writes the tools into the prompt (many ignore them silently)."""
    if not _renders_tools(tokenizer, getattr(tokenizer, "chat_template", None) or ""):
        raise bad_request("this model's chat template does not render tools, so the model would never see "
                          "them; use a checkpoint whose template supports tools", "tools")


_TOOLS_RENDERED: dict[str, bool] = {}  # chat template -> whether it writes tools into the prompt


def _renders_tools(tokenizer: Any, template: str) -> bool:
    if not template:
        return False
    cache = _TOOLS_RENDERED
    if template not in cache:
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=[_PROBE_TOOL],
                                                 tokenize=False, add_generation_prompt=True)
            cache[template] = _PROBE_TOOL["function"]["name"] in text
        except Exception:  # a template that fails on tools cannot render them
            cache[template] = False
    return cache[template]
