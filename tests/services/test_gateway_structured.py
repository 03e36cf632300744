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


# ---- limits, through the gateway app (no worker: a spec within them gets 503) ------------------

def _nested_arrays(depth: int) -> dict:
    """A JSON schema `depth` containers deep: arrays of arrays ... of integers."""
    schema = {"type": "integer"}
    for _ in range(depth - 1):
        schema = {"type": "array", "items": schema}
    return schema


@pytest.fixture(scope="module")
def offline_client():
    from fastapi.testclient import TestClient

    from checkpoints import demo_tokenizer
    from splitserve.services.gateway.app import build_app
    from splitserve.services.gateway.config import GatewayConfig

    config = GatewayConfig(model_dir="/nonexistent", served_model_name="m", worker_urls=("127.0.0.1:9",),
                           max_model_len=512, load_rpc_timeout_s=0.5)
    with TestClient(build_app(config, tokenizer=demo_tokenizer()), raise_server_exceptions=False) as client:
        yield client


def _tool(parameters: dict) -> list[dict]:
    return [{"type": "function", "function": {"name": "f", "parameters": parameters}}]


def _bodies(schema: dict) -> list[tuple[str, dict, str]]:
    """(path, body, the param a 400 about the schema names) for each way a request gives one."""
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    wrapped = {"type": "object", "properties": {"a": schema}}  # a tool's parameters are an object
    return [
        ("/v1/chat/completions", {**chat, "response_format": {"type": "json_schema",
                                                             "json_schema": {"name": "a", "schema": schema}}},
         "response_format"),
        ("/v1/completions", {"model": "m", "prompt": "x", "max_tokens": 4, "structured_outputs": {"json": schema}},
         "structured_outputs"),
        ("/v1/chat/completions", {**chat, "tools": _tool(wrapped), "tool_choice": "required"}, "tools"),
        ("/v1/chat/completions", {**chat, "tools": _tool(wrapped),
                                  "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tools"),
    ]


def test_a_schema_nested_past_the_depth_limit_is_a_400_naming_its_field(offline_client) -> None:
    """The tester's 900-deep schema took a compile thread for tens of seconds: refused up front."""
    for path, body, param in _bodies(_nested_arrays(900)):
        resp = offline_client.post(path, json=body)
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error["param"] == param and "--max-structured-outputs-depth" in error["message"], error
    for path, body, _ in _bodies(_nested_arrays(20)):
        assert offline_client.post(path, json=body).status_code == 503  # valid: on to the (absent) worker


def test_a_spec_past_the_size_limit_is_a_400(offline_client) -> None:
    big = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(3000)}}
    for path, body, param in _bodies(big):
        error = offline_client.post(path, json=body).json()["error"]
        assert error["param"] == param and "--max-structured-outputs-bytes" in error["message"], error
    for fields in ({"regex": "a" * 70000}, {"grammar": 'root ::= "' + "a" * 70000 + '"'}, {"choice": ["a" * 70000]}):
        resp = offline_client.post("/v1/completions", json={"model": "m", "prompt": "x", "structured_outputs": fields})
        assert resp.status_code == 400 and "--max-structured-outputs-bytes" in resp.json()["error"]["message"]


def test_a_structural_tag_too_deep_to_parse_is_a_400(offline_client) -> None:
    tag = "[" * 5000 + "]" * 5000  # within the size limit; deeper than Python's JSON parser goes
    resp = offline_client.post("/v1/completions", json={"model": "m", "prompt": "x",
                                                        "structured_outputs": {"structural_tag": tag}})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "structured_outputs", resp.text


def test_a_workers_verdict_on_the_spec_is_a_400_naming_its_field() -> None:
    """A compile error or a compile past its time names the field the spec came from; the engine
    being busy (RESOURCE_EXHAUSTED) is a 429, never a 400 that blames the request."""
    import grpc

    from splitserve.services.gateway.openai_protocol import to_api_error
    from splitserve.services.gateway.structured_outputs import spec_error
    from splitserve.services.gateway.worker_client import WorkerError

    spec = structured_outputs_spec(_chat(response_format={"type": "json_schema",
                                                          "json_schema": {"name": "x", "schema": SCHEMA}}))
    overran = WorkerError("w", "Generate", grpc.StatusCode.INVALID_ARGUMENT,
                          "invalid structured_outputs.json: it did not compile within 30 s (too large or too complex)")
    error = spec_error(overran, spec)
    assert (error.status_code, error.param, error.message) == (400, "response_format", overran.details)
    assert spec_error(overran, Spec(regex="a")).param == "structured_outputs"  # built offline: no field noted
    other = WorkerError("w", "Generate", grpc.StatusCode.INVALID_ARGUMENT, "prompt too long")
    assert spec_error(other, spec) is None and spec_error(overran, None) is None
    busy = WorkerError("w", "Generate", grpc.StatusCode.RESOURCE_EXHAUSTED, "the server is busy compiling")
    assert spec_error(busy, spec) is None and to_api_error(busy).status_code == 429
