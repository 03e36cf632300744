"""Each tool-call parser on recorded-style outputs of its model family, whole and streamed.

Streaming in random fragment sizes (hypothesis) must give the same content and calls as the
whole-output parse.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from splitserve.services.gateway.tool_parsers import TOOL_PARSERS, ToolCallStream, parse_output

# (parser, model output, expected content, expected [(name, arguments as a dict)])
SAMPLES = [
    # Qwen2.5 / Qwen3 / Hermes 2 Pro
    ("hermes", 'I will look that up.\n<tool_call>\n{"name": "get_weather", "arguments": '
               '{"location": "San Francisco, CA", "unit": "celsius"}}\n</tool_call>',
     "I will look that up.\n", [("get_weather", {"location": "San Francisco, CA", "unit": "celsius"})]),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris"}}\n</tool_call>\n'
               '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}\n</tool_call>',
     None, [("get_weather", {"location": "Paris"}), ("get_time", {"timezone": "Europe/Paris"})]),
    ("hermes", '<tool_call>\n{"name": "search", "arguments": {"query": "caf\\u00e9 \\"best\\" in Zürich {x}", '
               '"limit": 5, "filters": {"open_now": true, "price": null, "tags": ["a", "]"]}}}\n</tool_call>',
     None, [("search", {"query": 'café "best" in Zürich {x}', "limit": 5,
                        "filters": {"open_now": True, "price": None, "tags": ["a", "]"]}})]),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Tokyo"}}',  # EOS before the tag
     None, [("get_weather", {"location": "Tokyo"})]),
    ("hermes", '<tool_call>\n{"arguments": {"x": 1}, "name": "late_name"}\n</tool_call>', None,
     [("late_name", {"x": 1})]),
    ("hermes", "Use a < b, and <tool> is not <tool_call", "Use a < b, and <tool> is not <tool_call", []),
    ("hermes", '<tool_call>\nget_weather(location="Tokyo")\n</tool_call> sorry',
     '<tool_call>\nget_weather(location="Tokyo")\n</tool_call> sorry', []),
    ("hermes", "The capital of France is Paris.", "The capital of France is Paris.", []),
    # Llama 3.1 / 3.2 JSON
    ("llama3_json", '{"name": "get_weather", "parameters": {"location": "Paris, France"}}', None,
     [("get_weather", {"location": "Paris, France"})]),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"location": "Paris"}}; '
                    '{"name": "get_time", "parameters": {"tz": "CET"}}', None,
     [("get_weather", {"location": "Paris"}), ("get_time", {"tz": "CET"})]),
    ("llama3_json", "Paris is the capital of France.", "Paris is the capital of France.", []),
    ("llama3_json", '{"name": get_weather}', '{"name": get_weather}', []),
    # Mistral 7B v0.3 (list) and v11+ tokenizers (name[ARGS]{...})
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"location": "Paris"}}, '
                '{"name": "get_time", "arguments": {"tz": "CET"}}]', None,
     [("get_weather", {"location": "Paris"}), ("get_time", {"tz": "CET"})]),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"location": "Paris", "unit": "celsius"}'
                '[TOOL_CALLS]get_time[ARGS]{"tz": "CET"}', None,
     [("get_weather", {"location": "Paris", "unit": "celsius"}), ("get_time", {"tz": "CET"})]),
    ("mistral", 'Sure.[TOOL_CALLS]get_weather[ARGS]{"location": "Paris"}', "Sure.",
     [("get_weather", {"location": "Paris"})]),
    ("mistral", "[TOOL_CALLS]get weather now", "[TOOL_CALLS]get weather now", []),
    ("mistral", "No tools needed [TOOL", "No tools needed [TOOL", []),
]


def _calls(calls) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("parser_name,text,content,calls", SAMPLES)
def test_whole_output(parser_name, text, content, calls):
    parsed = parse_output(TOOL_PARSERS[parser_name](), text)
    assert parsed.content == content
    assert _calls(parsed.tool_calls) == calls
    assert all(c.id for c in parsed.tool_calls) and len({c.id for c in parsed.tool_calls}) == len(calls)


def _stream(parser_name: str, text: str, cuts: list[int]):
    stream = ToolCallStream(TOOL_PARSERS[parser_name]())
    deltas, pos = [], 0
    for size in cuts:
        deltas.append(stream.feed(text[pos:pos + size]))
        pos += size
    deltas.append(stream.feed(text[pos:]))
    deltas.append(stream.finish())
    return deltas


def _assemble(deltas):
    content, calls = "", {}
    for delta in deltas:
        content += delta.content
        for d in delta.tool_calls:
            if d.id is not None:
                assert d.index not in calls and d.name, "the first delta of a call carries its id and name"
                calls[d.index] = [d.name, ""]
            else:
                assert d.index in calls and d.name is None, "argument fragments follow the header"
                calls[d.index][1] += d.arguments
    return content, [(name, json.loads(args)) for _, (name, args) in sorted(calls.items())]


@settings(max_examples=40, deadline=None)
@given(sample=st.sampled_from(SAMPLES), cuts=st.lists(st.integers(1, 12), max_size=60))
def test_streamed_in_random_fragments_equals_whole(sample, cuts):
    parser_name, text, content, calls = sample
    whole = parse_output(TOOL_PARSERS[parser_name](), text)
    streamed_content, streamed_calls = _assemble(_stream(parser_name, text, cuts))
    assert streamed_content == (whole.content or "")
    assert streamed_calls == _calls(whole.tool_calls) == calls


def test_arguments_stream_before_the_call_ends():
    text = '<tool_call>\n{"name": "write", "arguments": {"text": "' + "abc " * 20 + '"}}\n</tool_call>'
    deltas = _stream("hermes", text, [1] * (len(text) - 1))
    fragments = [d for delta in deltas for d in delta.tool_calls if d.id is None]
    assert len(fragments) > 20  # incremental, not one piece at the end
    header = next(i for i, delta in enumerate(deltas) if delta.tool_calls)
    assert deltas[header].tool_calls[0].name == "write"


def test_parallel_tool_calls_off_keeps_the_first_call():
    text = SAMPLES[1][1]
    assert [c.name for c in parse_output(TOOL_PARSERS["hermes"](), text, max_calls=1).tool_calls] == ["get_weather"]
    stream = ToolCallStream(TOOL_PARSERS["hermes"](), max_calls=1)
    deltas = [stream.feed(text), stream.finish()]
    assert {d.index for delta in deltas for d in delta.tool_calls} == {0}


def test_truncated_call_is_content():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Tok'  # max_tokens cut it
    parsed = parse_output(TOOL_PARSERS["hermes"](), text)
    assert parsed.content == text and parsed.tool_calls == []


def test_mistral_call_ids_have_nine_alphanumerics():
    call = parse_output(TOOL_PARSERS["mistral"](), SAMPLES[13][1]).tool_calls[0]
    assert len(call.id) == 9 and call.id.isalnum()


@settings(max_examples=60, deadline=None)
@given(parser_name=st.sampled_from(sorted(TOOL_PARSERS)),
       text=st.lists(st.sampled_from(list('{}[]":,; \nab1<>/_') + ["<tool_call>", "</tool_call>", "[TOOL_CALLS]",
                                                                   "[ARGS]", '"name"', '"arguments"']),
                     max_size=40).map("".join))
def test_arbitrary_text_never_raises(parser_name, text):
    parsed = parse_output(TOOL_PARSERS[parser_name](), text)
    for call in parsed.tool_calls:
        assert isinstance(json.loads(call.arguments), dict)
    stream = ToolCallStream(TOOL_PARSERS[parser_name]())
    for ch in text:
        stream.feed(ch)
    stream.finish()
