"""Structured outputs through the `openai` client against a real disaggregated stack (async
scheduling on): the prefill worker samples the first token under the grammar, the decode worker
rebuilds the matcher from it and continues; greedy output equals the colocated engine's."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest


pytestmark = pytest.mark.slow

MODEL = "splitserve-demo"
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "tags", "size"],
          "properties": {"name": {"type": "string", "maxLength": 10},
                         "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
                         "size": {"type": "integer", "minimum": 1, "maximum": 500}}}
MESSAGES = [{"role": "user", "content": "Describe a thing."}]


@pytest.fixture(scope="module")
def stack(agent_api_stack):
    return agent_api_stack  # gateway, prefill, decode, async scheduling on (conftest.py)


def _json_schema_format(schema=SCHEMA) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": True}}


def test_json_schema_chat_streamed_and_not(stack) -> None:
    client = stack.openai()
    for temperature in (0.0, 1.0):
        r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=128, temperature=temperature,
                                           seed=7, response_format=_json_schema_format())
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
        stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=128, temperature=temperature,
                                                seed=7, response_format=_json_schema_format(), stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == r.choices[0].message.content  # seeded: the same output either way


def test_structured_outputs_field_on_completions(stack) -> None:
    client = stack.openai()
    regex = r"[0-9]{2,4}-[a-z]{3}"
    r = client.completions.create(model=MODEL, prompt="id:", max_tokens=32, temperature=1.0, n=3, seed=1,
                                  extra_body={"structured_outputs": {"regex": regex}})
    assert all(re.fullmatch(regex, c.text) and c.finish_reason == "stop" for c in r.choices)
    choices = ["left", "right", "up \"there\""]
    stream = client.completions.create(model=MODEL, prompt="go", max_tokens=16, temperature=1.0, stream=True,
                                       extra_body={"structured_outputs": {"choice": choices}})
    assert "".join(c.choices[0].text for c in stream if c.choices) in choices
    r = client.completions.create(model=MODEL, prompt="x", max_tokens=16, temperature=0.0,
                                  extra_body={"structured_outputs": {"grammar": 'root ::= "yes" | "no" [0-9]'}})
    assert re.fullmatch(r"yes|no[0-9]", r.choices[0].text)
    obj = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0.0,
                                         response_format={"type": "json_object"})
    assert obj.choices[0].message.content.startswith("{")


def test_greedy_structured_output_equals_the_colocated_engine(stack, demo_checkpoint_dir) -> None:
    from splitserve import LLM, SamplingParams
    from splitserve.shared.structured_outputs import StructuredOutputsParams

    prompts = ["def main():", "import sys\n"]
    served = [stack.openai().completions.create(
        model=MODEL, prompt=p, max_tokens=96, temperature=0.0,
        extra_body={"structured_outputs": {"json": SCHEMA}}).choices[0].text for p in prompts]
    llm = LLM(demo_checkpoint_dir)
    local = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=96,
                                                 structured_outputs=StructuredOutputsParams(json=SCHEMA)))
    assert served == [o.outputs[0].text for o in local]
    for text in served:
        jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.parametrize("stream", [False, True])
def test_bad_specs_are_400s_and_the_stack_keeps_serving(stack, stream) -> None:
    client = stack.openai()
    bad = [
        ({"response_format": _json_schema_format({"type": "nope"})}, 'Unsupported type "nope"'),
        ({"extra_body": {"structured_outputs": {"regex": "(unclosed"}}}, "invalid structured_outputs.regex"),
        ({"extra_body": {"structured_outputs": {"grammar": "root ::= undefined_rule"}}}, "undefined_rule"),
        ({"extra_body": {"structured_outputs": {"regex": "a", "choice": ["a"]}}}, "exactly one"),
        ({"extra_body": {"structured_outputs": {"structural_tag": "{}"}}}, "structural_tag"),
        ({"response_format": {"type": "json_object"}, "extra_body": {"structured_outputs": {"regex": "a"}}},
         "either response_format or structured_outputs"),
        ({"response_format": {"type": "json_schema"}}, "json_schema is required"),
    ]
    for kwargs, message in bad:
        with pytest.raises(openai.BadRequestError) as err:
            r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, stream=stream, **kwargs)
            list(r) if stream else None
        assert message in err.value.message, (kwargs, err.value.message)
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0.0)
    assert r.choices[0].finish_reason in ("stop", "length")
