"""Property test of the gateway's edge: whatever JSON a client sends to the OpenAI endpoints, the
answer is a well-formed OpenAI error (4xx) or a 503 (no worker in this test), never a 500."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from checkpoints import demo_tokenizer
from splitserve.services.gateway.app import build_app
from splitserve.services.gateway.config import GatewayConfig, RequestLimits

MODEL = "splitserve-demo"

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=True), st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)
KEYS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
        "min_p", "seed", "stop", "n", "stream", "stream_options", "logprobs", "top_logprobs", "presence_penalty",
        "frequency_penalty", "repetition_penalty", "ignore_eos", "echo", "user", "min_tokens", "stop_token_ids",
        "logit_bias", "best_of", "suffix", "priority", "tools", "tool_choice", "response_format", "structured_outputs", "skip_special_tokens",
        "add_generation_prompt", "unknown_field"]
bodies = st.dictionaries(st.sampled_from(KEYS), values, max_size=8).map(
    lambda d: {"model": MODEL, **d} if "model" not in d else d)


@pytest.fixture(scope="module")
def client():
    config = GatewayConfig(model_dir="/nonexistent", served_model_name=MODEL, worker_urls=("127.0.0.1:9",),
                           max_model_len=64, limits=RequestLimits(max_n=4), load_rpc_timeout_s=0.5)
    with TestClient(build_app(config, tokenizer=demo_tokenizer()), raise_server_exceptions=False) as c:
        yield c


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_no_input_gives_a_500(client, body, path):
    # json.dumps writes NaN/Infinity as Python does: the server must survive those too.
    resp = client.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    assert resp.status_code in (400, 404, 429, 503), (resp.status_code, resp.text)
    error = resp.json()["error"]
    assert error["message"] and error["type"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(KEYS), value=values, chat=st.booleans())
def test_one_random_field_in_a_valid_request_never_gives_a_500(client, key, value, chat):
    body = ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4} if chat
            else {"model": MODEL, "prompt": "hi", "max_tokens": 4})
    body[key] = value
    path = "/v1/chat/completions" if chat else "/v1/completions"
    resp = client.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    assert resp.status_code in (400, 404, 429, 503), (resp.status_code, resp.text)
    assert resp.json()["error"]["message"]
