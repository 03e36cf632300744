"""Forced tool calls (tool_choice "required" / a named function): the JSON schema the grammar
enforces, and the parsers that read the forced output, whole and streamed in random fragments."""

from __future__ import annotations

import json

import jsonschema
import pytest
from hypothesis import given, settings, strategies as st

from splitserve.services.gateway.chat_tools import forced_call_schema
from splitserve.services.gateway.tool_parsers import ToolCallStream, parse_output
from splitserve.services.gateway.tool_parsers.forced import NamedCallParser, RequiredCallsParser

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
                         (NamedCallParser("f"), "[1, 2]"), (NamedCallParser("f"), '{"a": ')):
        parsed = parse_output(parser, text)
        assert parsed.tool_calls == [] and parsed.content == text
