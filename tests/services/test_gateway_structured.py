"""response_format and structured_outputs -> the engine's spec, in the gateway (no workers)."""

from __future__ import annotations

import pytest

from splitserve.services.gateway.openai_protocol import APIError
from splitserve.services.gateway.request_models import ChatCompletionRequest, CompletionRequest
from splitserve.services.gateway.structured_outputs import structured_outputs_spec
from splitserve.shared.structured_outputs import StructuredOutputsParams as Spec

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


def _chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], **fields)


def test_response_formats() -> None:
    assert structured_outputs_spec(_chat()) is None
    assert structured_outputs_spec(_chat(response_format={"type": "text"})) is None
    assert structured_outputs_spec(_chat(response_format={"type": "json_object"})) == Spec(json_object=True)
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}
    assert structured_outputs_spec(_chat(response_format=fmt)).key() == Spec(json=SCHEMA).key()


def test_structured_outputs_field_on_completions() -> None:
    body = CompletionRequest(model="m", prompt="x", structured_outputs={"choice": ["a", "b"]})
    assert structured_outputs_spec(body) == Spec(choice=("a", "b"))
    body = CompletionRequest(model="m", prompt="x", structured_outputs={"json": '{"type": "string"}'})
    assert structured_outputs_spec(body).key() == Spec(json={"type": "string"}).key()


@pytest.mark.parametrize("fields, message", [
    ({"structured_outputs": {}}, "exactly one of json, regex, choice, grammar, json_object, structural_tag; got none"),
    ({"structured_outputs": {"regex": "a", "grammar": "root ::= \"a\""}}, "got regex, grammar"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json is not valid JSON"),
    ({"structured_outputs": {"choice": []}}, "choice must be a non-empty list"),
    ({"response_format": {"type": "json_schema"}}, "json_schema is required"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "not both"),
])
def test_bad_shapes_are_400s(fields, message) -> None:
    with pytest.raises(APIError) as err:
        structured_outputs_spec(_chat(**fields))
    assert err.value.status_code == 400 and message in err.value.message


def test_unknown_keys_are_rejected_by_name() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="whitespace_pattern"):
        _chat(structured_outputs={"whitespace_pattern": " "})
    with pytest.raises(ValidationError, match="response_format"):
        _chat(response_format={"type": "xml"})
