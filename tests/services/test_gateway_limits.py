"""The gateway's edge against hostile requests, with no worker behind it (every answer here comes
before routing): request limits, integer ranges, unsupported and unknown fields, invalid Unicode,
the API key, and what /health and /metrics reveal. Each refusal is an OpenAI-format 4xx naming
the field."""

from __future__ import annotations

import json
import threading

import pytest
from fastapi.testclient import TestClient

from checkpoints import demo_tokenizer
from splitserve.services.gateway.app import LONG_TEXT_CHARS, build_app
from splitserve.services.gateway.config import GatewayConfig, RequestLimits
from splitserve.shared.sampling_params import INT32_MAX

MODEL = "splitserve-demo"
UNREACHABLE = "127.0.0.1:9"  # discard port: no worker is ever healthy, so a valid request is a 503
LIMITS = RequestLimits(max_request_body_bytes=4096, max_prompts_per_request=3, max_n=2, max_stop_sequences=2,
                       max_stop_sequence_chars=5, max_stop_token_ids=3, max_logit_bias_tokens=2)
KEY = "sk-test-0123"
COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 4}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
PATHS = {"completion": "/v1/completions", "chat": "/v1/chat/completions"}


def _client(**kw) -> TestClient:
    config = GatewayConfig(model_dir="/nonexistent", served_model_name=MODEL, worker_urls=(UNREACHABLE,),
                           max_model_len=64, limits=LIMITS, load_rpc_timeout_s=0.5)
    return TestClient(build_app(config, tokenizer=demo_tokenizer(), **kw), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client():
    with _client() as c:
        yield c


def _error(resp, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    if param is not None:
        assert error["param"] == param, error
    return error


def _post(client, kind: str, **fields):
    return client.post(PATHS[kind], json={**(CHAT if kind == "chat" else COMPLETION), **fields})


# ---- limits ------------------------------------------------------------------------------------

def test_a_body_over_the_limit_is_413_before_it_is_parsed(client):
    big = json.dumps({**COMPLETION, "prompt": "x" * 5000}).encode()
    _error(client.post("/v1/completions", content=big, headers={"content-type": "application/json"}), 413)
    # Without a Content-Length (chunked), the body is counted as it arrives.
    chunks = iter([big[:3000], big[3000:]])
    _error(client.post("/v1/completions", content=chunks, headers={"content-type": "application/json"}), 413)


@pytest.mark.parametrize("fields,param,flag", [
    ({"prompt": ["a", "b", "c", "d"]}, "prompt", "--max-prompts-per-request"),
    ({"prompt": [[1], [2], [3], [4]]}, "prompt", "--max-prompts-per-request"),
    ({"n": 3}, "n", "--max-n"),
    ({"stop": ["a", "b", "c"]}, "stop", "--max-stop-sequences"),
    ({"stop": "abcdef"}, "stop", "--max-stop-sequence-chars"),
    ({"stop_token_ids": [1, 2, 3, 4]}, "stop_token_ids", "--max-stop-token-ids"),
    ({"logit_bias": {"1": 1, "2": 1, "3": 1}}, "logit_bias", "--max-logit-bias-tokens"),
])
@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_each_limit_is_a_400_naming_its_flag(client, kind, fields, param, flag):
    if kind == "chat" and param == "prompt":
        pytest.skip("chat has no prompt list")
    assert flag in _error(_post(client, kind, **fields), 400, param)["message"]


def test_requests_at_the_limits_pass_validation(client):
    fields = {"n": 2, "stop": ["a", "bcdef"], "stop_token_ids": [1, 2, 3], "logit_bias": {"1": 100, "2": -100}}
    assert _post(client, "completion", prompt=["a", "b", "c"], **fields).status_code == 503  # no worker
    assert _post(client, "chat", **fields).status_code == 503


def test_logit_bias_ids_must_be_in_the_vocabulary(client):
    vocab = len(demo_tokenizer())
    assert str(vocab) in _error(_post(client, "completion", logit_bias={str(vocab): 1}), 400, "logit_bias")["message"]
    _error(_post(client, "completion", logit_bias={"1": 101}), 400)
    _error(_post(client, "completion", logit_bias={"x": 1}), 400)


def test_text_too_long_for_the_context_is_refused_without_tokenizing(monkeypatch):
    with _client_with_body_limit(10**7) as c:
        state = c.app.state.gateway
        too_long = "a" * (state.prepare_context().max_prompt_chars() + 1)

        def never(*args, **kwargs):
            raise AssertionError("the tokenizer was called")

        monkeypatch.setattr(state.tokenizer, "encode", never)
        monkeypatch.setattr(state.tokenizer, "apply_chat_template", never)
        error = _error(_post(c, "completion", prompt=too_long), 400, "prompt")
        assert "characters" in error["message"] and "64 tokens" in error["message"]
        _error(_post(c, "chat", messages=[{"role": "user", "content": too_long}]), 400, "messages")


def _client_with_body_limit(limit: int) -> TestClient:
    config = GatewayConfig(model_dir="/nonexistent", served_model_name=MODEL, worker_urls=(UNREACHABLE,),
                           max_model_len=64, load_rpc_timeout_s=0.5,
                           limits=RequestLimits(max_request_body_bytes=limit))
    return TestClient(build_app(config, tokenizer=demo_tokenizer()), raise_server_exceptions=False)


def test_a_long_text_does_not_queue_short_requests_behind_it(client):
    """Long texts have their own tokenizer thread: with it blocked, short requests still go through."""
    state = client.app.state.gateway
    release = threading.Event()
    blocker = state.long_tokenize_pool.submit(release.wait, 60)
    try:
        assert _post(client, "completion").status_code == 503  # prepared, then no worker
        assert _post(client, "chat").status_code == 503
    finally:
        release.set()
        blocker.result(timeout=60)
    long_prompt = "ab " * (LONG_TEXT_CHARS // 3 + 1)
    with _client_with_body_limit(10**6) as big:  # the long lane serves it once free
        assert _post(big, "completion", prompt=long_prompt[:60]).status_code == 503
        resp = big.post("/v1/completions", json={**COMPLETION, "prompt": long_prompt})
        assert resp.status_code == 400 and "context length" in resp.json()["error"]["message"]


# ---- ranges, fields, text ----------------------------------------------------------------------

INTEGER_FIELDS = ["top_k", "seed", "max_tokens", "min_tokens", "n", "priority", "best_of"]


@pytest.mark.parametrize("kind", ["completion", "chat"])
@pytest.mark.parametrize("name", INTEGER_FIELDS + ["stop_token_ids", "logit_bias", "logprobs", "top_logprobs",
                                                   "max_completion_tokens"])
def test_integers_past_their_range_are_400_never_500(client, kind, name):
    huge = 2**63 if name == "seed" else INT32_MAX + 1
    values = {"stop_token_ids": [[huge], [-1]], "logit_bias": [{str(huge): 1}, {"-1": 1}]}.get(name, [huge, -(huge + 1)])
    for value in values:
        fields = {name: value}
        if kind == "chat" and name in ("logprobs", "best_of"):
            fields = {"logprobs": True, "top_logprobs": value} if name == "logprobs" else {name: value}
        resp = _post(client, kind, **fields)
        assert resp.status_code == 400, (fields, resp.status_code, resp.text)


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_unknown_fields_are_400_naming_them(client, kind):
    error = _error(_post(client, kind, frobnicate=1), 400, "frobnicate")
    assert "frobnicate" in error["message"] and "not supported" in error["message"]
    _error(_post(client, kind, stream_options={"include_usage": True, "extra": 1}), 400, "stream_options.extra")


@pytest.mark.parametrize("kind,fields,param", [
    ("completion", {"suffix": "x"}, "suffix"),
    ("chat", {"tool_choice": "auto"}, "tool_choice"),  # without tools (tools: test_gateway_tools.py)
    ("chat", {"functions": [{"name": "f"}]}, "functions"), ("chat", {"function_call": "auto"}, "function_call"),
    ("chat", {"echo": True}, "echo"), ("chat", {"best_of": 1}, "best_of"),
])
def test_unsupported_openai_fields_are_400_naming_them(client, kind, fields, param):
    assert param in _error(_post(client, kind, **fields), 400, param)["message"]


@pytest.mark.parametrize("kind,fields", [
    ("completion", {"user": "u-1", "echo": False, "suffix": None, "best_of": 2, "n": 2}),
    ("completion", {"best_of": 1}),
    ("completion", {"echo": True, "best_of": 2}),  # implemented (tests/vllm_diff)
    ("chat", {"user": "u-1", "tools": [], "tool_choice": "none", "response_format": {"type": "text"},
              "parallel_tool_calls": False}),
])
def test_their_off_values_and_user_are_accepted(client, kind, fields):
    assert _post(client, kind, **fields).status_code == 503  # valid: it got as far as routing


@pytest.mark.parametrize("kind,fields", [
    ("completion", {"prompt": "a\ud800b"}), ("completion", {"prompt": ["ok", "\udfff"]}),
    ("completion", {"stop": ["\ud800"]}), ("chat", {"messages": [{"role": "user", "content": "x\ud83d"}]}),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]}),
    ("completion", {"user": "\ud800"}), ("completion", {"model": "\ud800"}),
])
def test_lone_surrogates_are_400(client, kind, fields):
    body = json.dumps({**(CHAT if kind == "chat" else COMPLETION), **fields})  # ASCII: \\ud800 escapes
    resp = client.post(PATHS[kind], content=body.encode(), headers={"content-type": "application/json"})
    assert "Unicode" in _error(resp, 400)["message"]


@pytest.mark.parametrize("value", ["Infinity", "NaN", "-Infinity"])
def test_non_finite_floats_are_400(client, value):
    body = '{"model": "%s", "prompt": "hi", "temperature": %s}' % (MODEL, value)
    _error(client.post("/v1/completions", content=body.encode(), headers={"content-type": "application/json"}),
           400, "temperature")


# ---- API key, /health and /metrics -------------------------------------------------------------

def test_the_api_key_guards_every_v1_route():
    with _client(api_key=KEY) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
            for method, path in (("get", "/v1/models"), ("post", "/v1/completions"), ("post", "/v1/chat/completions")):
                resp = getattr(c, method)(path, headers=headers, **({"json": COMPLETION} if method == "post" else {}))
                assert _error(resp, 401)["code"] == "invalid_api_key"
        good = {"Authorization": f"Bearer {KEY}"}
        assert c.get("/v1/models", headers=good).status_code == 200
        assert c.post("/v1/completions", json=COMPLETION, headers=good).status_code == 503  # no worker
        assert c.get("/health").status_code == 503 and c.get("/metrics").status_code == 200  # open


def test_health_and_metrics_reveal_no_addresses_or_error_text(client):
    client.post("/v1/completions", json=COMPLETION)  # a failed routing attempt leaves an error behind
    health = client.get("/health")
    assert health.json()["workers"] == [{"name": "colocated-0", "role": "colocated", "healthy": False}]
    for text in (health.text, client.get("/metrics").text):
        assert UNREACHABLE not in text and "127.0.0.1" not in text and "refused" not in text.lower()


def test_a_50_mb_body_is_refused_from_its_headers_over_real_http():
    """Real uvicorn, raw socket: the 413 comes back after the headers alone, before any of the
    50 MB is sent, so nothing grows and nothing waits for it."""
    import http.client
    import socket

    from scripted_worker import BackgroundLoop, GatewayServer

    loop = BackgroundLoop()
    config = GatewayConfig(model_dir="/nonexistent", served_model_name=MODEL, worker_urls=(UNREACHABLE,),
                           max_model_len=64, load_rpc_timeout_s=0.5)  # the default limits
    server = GatewayServer(loop, build_app(config, tokenizer=demo_tokenizer()))
    try:
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {50 * 2**20}\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
            sock.sendall(head + b'{"model": "splitserve-demo", "prompt": "')
            reply = http.client.HTTPResponse(sock)
            reply.begin()
            assert reply.status == 413
            assert json.loads(reply.read())["error"]["code"] == "request_too_large"
    finally:
        server.stop()
        loop.close()
