"""Forced tool calls (tool_choice "required" / a named function): the JSON schema the grammar
enforces, the parsers that read the forced output, whole and streamed in random fragments, and the
chat responses built from a forced output that max_tokens cut off (whole and streamed alike)."""

from __future__ import annotations

import json
from collections.abc import Callable

import jsonschema
import pytest
from hypothesis import given, settings, strategies as st

from splitserve.services.gateway.chat_output import OutputSpec
from splitserve.services.gateway.chat_tools import forced_call_schema
from splitserve.services.gateway.completion import ChoiceDelta
from splitserve.services.gateway.prepare import PreparedRequest
from splitserve.services.gateway.responses import ResponseBuilder
from splitserve.services.gateway.tool_parsers import ToolCallStream, ToolParser, parse_output
from splitserve.services.gateway.tool_parsers.forced import NamedCallParser, RequiredCallsParser
from splitserve.shared.sampling_params import SamplingParams

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
           "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time"}}]

arguments = st.fixed_dictionaries({"city": st.text(max_size=12)}, optional={"days": st.integers(1, 30)})
calls = st.lists(st.one_of(st.builds(lambda a: {"name": "get_weather", "parameters": a}, arguments),
                           st.just({"name": "get_time", "parameters": {}})), min_size=1, max_size=3)


def _stream(parser, text: str, cuts: list[int]):
    stream, pos, deltas = ToolCallStream(parser), 0, []
    for size in [*cuts, len(text)]:
        deltas.append(stream.feed(text[pos:pos + size]))
        pos += size
    deltas.append(stream.finish())
    names, args = {}, {}
    for delta in deltas:
        assert not delta.content
        for d in delta.tool_calls:
            if d.id is not None:
                names[d.index], args[d.index] = d.name, ""
            args[d.index] += d.arguments
    return [(names[i], json.loads(args[i])) for i in sorted(names)]


@settings(max_examples=40, deadline=None)
@given(forced=calls, cuts=st.lists(st.integers(1, 9), max_size=30), indent=st.sampled_from([None, 2]))
def test_required_output_matches_the_schema_and_parses_whole_and_streamed(forced, cuts, indent):
    text = json.dumps(forced, indent=indent, ensure_ascii=False)
    jsonschema.validate(forced, forced_call_schema(TOOLS, None))
    expected = [(c["name"], c["parameters"]) for c in forced]
    whole = parse_output(RequiredCallsParser(), text)
    assert whole.content is None and [(c.name, json.loads(c.arguments)) for c in whole.tool_calls] == expected
    assert _stream(RequiredCallsParser(), text, cuts) == expected


def test_required_schema_rejects_what_the_tools_do_not_allow():
    schema = forced_call_schema(TOOLS, max_calls=1)
    for bad in ([], [{"name": "get_weather", "parameters": {"days": 2}}], [{"name": "nope", "parameters": {}}],
                [{"name": "get_time", "parameters": {}}] * 2, {"name": "get_time", "parameters": {}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


@settings(max_examples=30, deadline=None)
@given(args=arguments, cuts=st.lists(st.integers(1, 9), max_size=20))
def test_named_output_is_the_arguments(args, cuts):
    text = json.dumps(args)
    (call,) = parse_output(NamedCallParser("get_weather"), text).tool_calls
    assert call.name == "get_weather" and json.loads(call.arguments) == args
    assert _stream(NamedCallParser("get_weather"), text, cuts) == [("get_weather", args)]


def test_forced_output_that_is_not_a_call_is_content():
    for parser, text in ((RequiredCallsParser(), "sorry"), (RequiredCallsParser(), '[{"name": 1}]'),
                         (NamedCallParser("f"), "[1, 2]")):
        parsed = parse_output(parser, text)
        assert parsed.tool_calls == [] and parsed.content == text


FORCED = '[{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}, {"name": "get_time", "parameters": {}}]'


def _raw_calls(parser, text: str, cuts: list[int]) -> tuple[str, list[tuple[str, str]]]:
    """(content, [(name, raw arguments)]) of `text` streamed in `cuts`."""
    stream, pos, content, calls = ToolCallStream(parser), 0, "", {}
    for size in [*cuts, len(text)]:
        delta = stream.feed(text[pos:pos + size])
        pos += size
        content += delta.content
        for d in delta.tool_calls:
            calls.setdefault(d.index, [d.name, ""])[1] += d.arguments
    final = stream.finish()
    content += final.content
    for d in final.tool_calls:
        calls.setdefault(d.index, [d.name, ""])[1] += d.arguments
    return content, [tuple(calls[i]) for i in sorted(calls)]


@settings(max_examples=60, deadline=None)
@given(cut=st.integers(0, len(FORCED)), cuts=st.lists(st.integers(1, 9), max_size=30))
def test_required_output_cut_off_is_the_calls_so_far_whole_and_streamed(cut, cuts):
    """max_tokens ends the forced output anywhere: the calls it got to, the last one with the
    arguments text written so far; a call cut inside its name is dropped; never content."""
    text = FORCED[:cut]
    whole = parse_output(RequiredCallsParser(), text)
    calls = [(c.name, c.arguments) for c in whole.tool_calls]
    assert not whole.content and _raw_calls(RequiredCallsParser(), text, cuts) == ("", calls)
    full = [("get_weather", '{"city": "Paris", "days": 3}'), ("get_time", "{}")]
    assert [name for name, _ in calls] == [name for name, _ in full[:len(calls)]]
    assert all(full_args.startswith(args) for (_, args), (_, full_args) in zip(calls, full))
    assert calls[:-1] == full[:len(calls)][:-1]  # only the last call can be unfinished
    assert len(calls) == text.count('"name": "get_weather"') + text.count('"name": "get_time"')


def test_required_output_cut_off_examples():
    for text, calls in (('[{"', []), ('[{"name": "get_we', []), ('[{"name": "get_weather", ', [("get_weather", "")]),
                        ('[{"name": "get_weather", "parameters": {"city": "Pa', [("get_weather", '{"city": "Pa')])):
        parsed = parse_output(RequiredCallsParser(), text)
        assert parsed.content in ("", None) and [(c.name, c.arguments) for c in parsed.tool_calls] == calls, text


def test_named_output_cut_off_is_the_call_with_the_arguments_so_far():
    for text in ("", "{", '{"city": ', '{"city": "Par'):
        (call,) = parse_output(NamedCallParser("get_weather"), text).tool_calls
        assert call.name == "get_weather" and call.arguments == text
        assert _raw_calls(NamedCallParser("get_weather"), text, [1] * len(text)) == ("", [("get_weather", text)])


def _chat(parser: Callable[[], ToolParser], text: str, stream: bool) -> dict:
    """The chat response to `text` (one delta per character, the last one ending at max_tokens):
    the whole body, or the streamed chunks put back together as a message."""
    prep = PreparedRequest("chat", "chatcmpl-test", "m", [[1, 2]], SamplingParams(), stream, False,
                           output=OutputSpec(parser))
    builder = ResponseBuilder(prep, tokenizer=None)
    deltas = [ChoiceDelta(0, ch, 1, finish_reason="length" if k == len(text) - 1 else None)
              for k, ch in enumerate(text)]
    if not stream:
        for delta in deltas:
            builder.add(delta)
        choice = builder.final_body()["choices"][0]
        return {**choice["message"], "finish_reason": choice["finish_reason"]}
    message, calls = {"content": ""}, {}
    for delta in deltas:
        builder.add(delta)
        for event in builder.sse_chunks(delta):
            (choice,) = json.loads(event.decode().removeprefix("data: "))["choices"]
            message["content"] += choice["delta"].get("content") or ""
            for d in choice["delta"].get("tool_calls", []):
                calls.setdefault(d["index"], {"name": d["function"].get("name"), "arguments": ""})
                calls[d["index"]]["arguments"] += d["function"]["arguments"]
            message["finish_reason"] = choice["finish_reason"]
    message["tool_calls"] = [calls[i] for i in sorted(calls)] or None
    return message


@pytest.mark.parametrize("parser,text,arguments", [
    (RequiredCallsParser, '[{"name": "get_weather", "parameters": {"city": "Par', '{"city": "Par'),
    (RequiredCallsParser, '[{"name": "get_weather", ', ""),
    (RequiredCallsParser, '[{"', None),  # cut before the name: no call, no content
    (lambda: NamedCallParser("get_weather"), '{"city": "Par', '{"city": "Par')])
def test_forced_call_cut_off_by_max_tokens_is_the_same_call_streamed_and_whole(parser, text, arguments):
    """A call, with the arguments text written so far, and finish_reason length; the grammar's
    wrapper is never content."""
    whole, streamed = _chat(parser, text, stream=False), _chat(parser, text, stream=True)
    for message in (whole, streamed):
        assert message["finish_reason"] == "length" and not message["content"], message
    calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
             for c in whole.get("tool_calls") or []] or None
    assert calls == streamed["tool_calls"] == ([{"name": "get_weather", "arguments": arguments}]
                                               if arguments is not None else None)
