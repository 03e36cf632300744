"""`strict: true` function tools under `tool_choice: "auto"`: the gateway builds a structural tag
(free text; from the parser's `<tool_call>` on, a call to one of the tools whose strict arguments
fit its schema), it crosses the proto, the engine's grammar compiler holds real token sequences to
it, and it reaches the worker from both APIs (scripted worker) unless the request constrains its
output itself."""

from __future__ import annotations

import json

import pytest

from checkpoints import demo_tokenizer
from scripted_tools import MODEL, client as make_client, tool_stack
from splitserve.services.gateway.chat_tools import resolve_tool_use, strict_calls_spec
from splitserve.services.gateway.config import AgentApiConfig
from splitserve.services.gateway.request_models import ChatCompletionRequest
from splitserve.services.gateway.tool_parsers import TOOL_PARSERS
from splitserve.shared.protocol import convert
from splitserve.shared.sampling_params import SamplingParams

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
                   "required": ["city"], "additionalProperties": False}}}
NOTE = {"type": "function", "function": {"name": "take_note", "parameters": {"type": "object"}}}  # not strict
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
HERMES = AgentApiConfig(enable_auto_tool_choice=True, tool_call_parser="hermes")


def _use(tools, config=HERMES, **fields):
    return resolve_tool_use(ChatCompletionRequest(model=MODEL, messages=ASK, tools=tools, **fields), config)


def _tag(spec) -> dict:
    return json.loads(spec.structural_tag)["format"]


def test_only_strict_tools_with_a_triggered_parser_constrain_auto_calls():
    fmt = _tag(_use([WEATHER, NOTE]).constraint)
    assert fmt["triggers"] == ["<tool_call>"] and not fmt["stop_after_first"]
    assert [t["content"]["json_schema"] for t in fmt["tags"]] == [WEATHER["function"]["parameters"], {"type": "object"}]
    assert _tag(_use([WEATHER], parallel_tool_calls=False).constraint)["stop_after_first"]
    assert _use([NOTE]).constraint is None
    llama = AgentApiConfig(enable_auto_tool_choice=True, tool_call_parser="llama3_json")
    assert _use([WEATHER], llama).constraint is None  # no marker to trigger on: calls stay free


def test_the_spec_crosses_the_proto():
    spec = strict_calls_spec([WEATHER], TOOL_PARSERS["hermes"], None)
    back = convert.sampling_params_from_proto(convert.sampling_params_to_proto(SamplingParams(structured_outputs=spec)))
    assert back.structured_outputs.kind == "structural_tag" and back.structured_outputs.key() == spec.key()


@pytest.fixture(scope="module")
def compiled(demo_checkpoint_dir):
    from splitserve.shared.grammar import GrammarCompiler

    compiler = GrammarCompiler(demo_checkpoint_dir, 4096)
    yield compiler.submit(strict_calls_spec([WEATHER, NOTE], TOOL_PARSERS["hermes"], None)).result(timeout=120)
    compiler.close()


def _accepts(compiled, text: str, then_stop: bool = False) -> bool:
    from splitserve.shared.grammar import RequestGrammar

    tokenizer = demo_tokenizer()
    grammar = RequestGrammar(compiled, [tokenizer.eos_token_id])
    ids = tokenizer.encode(text, add_special_tokens=False) + ([tokenizer.eos_token_id] if then_stop else [])
    return all(grammar.accept(t) for t in ids)


CALL = '<tool_call>\n{"name": "get_weather", "arguments": '


@pytest.mark.parametrize("text,ok", [
    ("Just text, no call.", True),
    (f'Let me check. {CALL}{{"city": "Paris"}}}}\n</tool_call> Done.', True),
    ('<tool_call>\n{"name": "take_note", "arguments": {"any": [1, 2]}}\n</tool_call>', True),  # not strict
    (f'{CALL}{{"city": "Berlin"}}}}\n</tool_call>', False),  # outside the enum
    (f'{CALL}{{"town": "Paris"}}}}\n</tool_call>', False),  # not a property
    ('<tool_call>\n{"name": "unknown_tool", "arguments": {}}\n</tool_call>', False),
])
def test_the_engine_grammar_holds_calls_to_their_schema(compiled, text, ok):
    assert _accepts(compiled, text, then_stop=True) is ok


def test_a_structural_tag_that_does_not_compile_names_the_field(demo_checkpoint_dir):
    from splitserve.shared.grammar import GrammarCompiler, GrammarError
    from splitserve.shared.structured_outputs import StructuredOutputsParams

    compiler = GrammarCompiler(demo_checkpoint_dir, 4096)
    try:
        with pytest.raises(GrammarError, match="invalid structured_outputs.structural_tag"):
            compiler.submit(StructuredOutputsParams(structural_tag='{"type": "nope"}')).result(timeout=120)
    finally:
        compiler.close()


def test_a_call_cannot_end_before_its_closing_tag(compiled):
    assert _accepts(compiled, f'{CALL}{{"city": "Rome"}}')
    assert not _accepts(compiled, f'{CALL}{{"city": "Rome"}}', then_stop=True)


# ---- through the gateway (scripted worker: it records what the worker is sent) -----------------

@pytest.fixture(scope="module")
def stack():
    with tool_stack() as parts:
        yield parts


def _sent(worker):
    return convert.sampling_params_from_proto(worker.record.generates[-1].sampling_params).structured_outputs


def test_both_apis_send_strict_calls_to_the_worker(stack):
    gateway, worker, _ = stack
    client = make_client(gateway)
    client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER])
    assert _sent(worker).kind == "structural_tag"
    responses_tool = {"type": "function", **WEATHER["function"]}
    client.responses.create(model=MODEL, input="What is the weather in Paris?", tools=[responses_tool])
    assert _tag(_sent(worker))["tags"][0]["content"]["json_schema"] == WEATHER["function"]["parameters"]
    client.responses.create(model=MODEL, input="hi", tools=[{**responses_tool, "strict": False}])
    assert _sent(worker) is None


def test_the_requests_own_structured_outputs_are_kept(stack):
    gateway, worker, _ = stack
    make_client(gateway).chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER],
                                                 response_format={"type": "json_object"})
    assert _sent(worker).kind == "json_object"
