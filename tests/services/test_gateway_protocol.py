"""Request validation and error mapping of the real gateway app (no workers needed).

Every malformed request must get a 4xx with OpenAI's error JSON, never a 500.
"""

from __future__ import annotations

import logging
import sys

import pytest
from fastapi.testclient import TestClient

from checkpoints import demo_tokenizer
from splitserve.services.gateway.app import build_app
from splitserve.services.gateway.config import GatewayConfig, RequestLimits

MODEL = "splitserve-demo"
MAX_MODEL_LEN = 64
UNREACHABLE = "127.0.0.1:9"  # discard port: connection refused, so no worker is ever healthy


@pytest.fixture(scope="module")
def client():
    config = GatewayConfig(model_dir="/nonexistent", served_model_name=MODEL, worker_urls=(UNREACHABLE,),
                           max_model_len=MAX_MODEL_LEN, limits=RequestLimits(max_n=4), load_rpc_timeout_s=0.5)
    with TestClient(build_app(config, tokenizer=demo_tokenizer()), raise_server_exceptions=False) as c:
        yield c


def _assert_error(resp, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_malformed_json_is_400(client, path):
    resp = client.post(path, content=b'{"model": "splitserve-demo", "prompt": ', headers={"content-type": "application/json"})
    assert "JSON" in _assert_error(resp, 400)["message"]


@pytest.mark.parametrize("body,param", [
    ({"model": MODEL, "prompt": "hi", "max_tokens": "many"}, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"model": MODEL, "prompt": {"text": "hi"}}, "prompt"),
    ({"model": MODEL, "prompt": ["a", 1]}, "prompt"),
    ({"model": MODEL, "prompt": "hi", "stream": "yes please"}, "stream"),
    ({"model": MODEL, "prompt": "hi", "stop": 5}, "stop"),
    ({"model": MODEL}, "prompt"),
])
def test_wrong_types_and_missing_fields_are_400(client, body, param):
    _assert_error(client.post("/v1/completions", json=body), 400, param=param)


@pytest.mark.parametrize("field,value", [
    ("max_tokens", -1), ("max_tokens", 0), ("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5),
    ("top_k", -2), ("logprobs", 21), ("presence_penalty", 3.0), ("repetition_penalty", 0.0), ("n", 0),
])
def test_out_of_range_values_are_400(client, field, value):
    _assert_error(client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", field: value}), 400, param=field)


def test_chat_shape_errors_are_400(client):
    _assert_error(client.post("/v1/chat/completions", json={"model": MODEL, "messages": []}), 400, param="messages")
    _assert_error(client.post("/v1/chat/completions", json={"model": MODEL, "messages": "hello"}), 400, param="messages")
    _assert_error(client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}), 400, param="top_logprobs")
    _assert_error(client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -3}), 400,
        param="max_completion_tokens")


def test_unknown_model_is_404(client):
    for path, extra in (("/v1/completions", {"prompt": "hi"}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        _assert_error(client.post(path, json={"model": "gpt-17", **extra}), 404, param="model", code="model_not_found")


def test_n_above_the_bound_is_400(client):
    assert "at most 4" in _assert_error(
        client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "n": 5}), 400, param="n")["message"]


def test_prompt_longer_than_the_context_is_400(client):
    error = _assert_error(client.post("/v1/completions", json={"model": MODEL, "prompt": list(range(1, 70))}), 400)
    assert str(MAX_MODEL_LEN) in error["message"] and "69" in error["message"]


def test_max_tokens_beyond_the_context_is_400_naming_both_numbers(client):
    """As vLLM: max_tokens over the context is refused; prompt + max_tokens over it is not (the
    completion stops at the context's end; tests/vllm_diff: cmpl_max_tokens_over_context)."""
    error = _assert_error(client.post("/v1/completions", json={
        "model": MODEL, "prompt": list(range(1, 41)), "max_tokens": 65}), 400, param="max_tokens")
    for number in ("64", "65"):
        assert number in error["message"], error["message"]


def test_token_ids_outside_the_vocabulary_and_empty_prompts_are_400(client):
    _assert_error(client.post("/v1/completions", json={"model": MODEL, "prompt": [1, 10**9]}), 400, param="prompt")
    _assert_error(client.post("/v1/completions", json={"model": MODEL, "prompt": []}), 400, param="prompt")
    _assert_error(client.post("/v1/completions", json={"model": MODEL, "prompt": [""]}), 400, param="prompt")


def test_valid_request_without_a_healthy_worker_is_503(client):
    for stream in (False, True):
        error = _assert_error(client.post("/v1/completions", json={
            "model": MODEL, "prompt": "hello", "max_tokens": 4, "stream": stream}), 503)
        assert "no healthy colocated worker" in error["message"]


def test_health_is_503_without_workers_and_models_lists_the_served_name(client):
    resp = client.get("/health")
    assert resp.status_code == 503 and resp.json()["workers"][0]["healthy"] is False
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]


def test_unknown_route_is_an_openai_error(client):
    _assert_error(client.get("/v1/nothing"), 404)


def test_metrics_count_requests_by_status(client):
    client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    text = client.get("/metrics").text
    assert 'splitserve_gateway_requests_total{endpoint="/v1/completions",status="404"}' in text


def test_gateway_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys; import splitserve.services.gateway.app, splitserve.services.gateway.main; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_cli_args_become_a_config(tmp_path):
    import argparse

    from splitserve.services.gateway.config import GatewayConfigError
    from splitserve.services.gateway.main import add_gateway_args, gateway_config_from_args

    parser = argparse.ArgumentParser()
    add_gateway_args(parser)
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    config = gateway_config_from_args(parser.parse_args(
        ["--model", str(model_dir), "--prefill-urls", "a:1,b:2", "--decode-urls", "c:3", "--max-n", "8",
         "--max-model-len", "100"]))
    assert config.served_model_name == str(model_dir) and config.prefill_urls == ("a:1", "b:2")  # vLLM's rule
    assert config.decode_urls == ("c:3",) and config.limits.max_n == 8 and config.max_model_len == 100
    assert config.max_inflight_requests == GatewayConfig.max_inflight_requests  # defaults from the dataclass
    named = gateway_config_from_args(parser.parse_args(
        ["--model", str(model_dir), "--served-model-name", "x", "y", "--worker-urls", "w:1"]))
    assert named.served_model_name == "x" and named.served_model_aliases == ("y",) and named.worker_urls == ("w:1",)
    with pytest.raises(GatewayConfigError, match="together"):
        gateway_config_from_args(parser.parse_args(["--model", str(model_dir), "--prefill-urls", "a:1"]))


@pytest.mark.parametrize("path,extra", [("/v1/completions", {"prompt": "hi"}),
                                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})])
@pytest.mark.parametrize("fields,param", [
    ({"prompt_cache_key": "k" * 257}, "prompt_cache_key"),
    ({"prompt_cache_key": ""}, "prompt_cache_key"),
    ({"prompt_cache_key": "agent", "prompt_cache_retention": "forever"}, "prompt_cache_retention"),
    ({"prompt_cache_retention": "24h"}, "prompt_cache_retention"),  # retention of no session
])
def test_bad_prompt_cache_fields_are_400(client, path, extra, fields, param):
    _assert_error(client.post(path, json={"model": MODEL, **extra, **fields}), 400, param=param)


def test_the_gateway_serves_on_uvloop_and_says_so_when_it_cannot(monkeypatch, caplog):
    from splitserve.services.gateway.main import event_loop

    assert event_loop() == "uvloop"  # a dependency, through uvicorn[standard]
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` raises ImportError
    with caplog.at_level(logging.WARNING):
        assert event_loop() == "asyncio"
    assert "uvloop is not installed" in caplog.text
