"""What a black-box run of hostile and vLLM-scripted clients found at the gateway's edge, each
against the real gateway in front of the scripted worker (scripted_tools.py): token ids in
streams, echo with max_tokens 0, ids outside the vocabulary, an unbounded X-Request-Id, a body
that never arrives, a JSON body under another content type, non-text content parts, and the
Responses API's metadata and include."""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from scripted_tools import MODEL
from splitserve.services.gateway import app as gateway_app


def _post(gateway, path: str, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(f"{gateway.url}{path}", json=body, timeout=30, **kwargs)


def _events(response: httpx.Response) -> list[dict]:
    lines = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    return [json.loads(line) for line in lines if line != "[DONE]"]


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_a_stream_with_return_token_ids_names_the_prompt_ids_on_each_choice_first_chunk(scripted_stack):
    gateway, _, _ = scripted_stack
    body = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 4, "stream": True, "return_token_ids": True, "n": 2,
            "temperature": 1.0}
    chunks = [c["choices"][0] for c in _events(_post(gateway, "/v1/completions", body)) if c["choices"]]
    for index in (0, 1):
        mine = [c for c in chunks if c["index"] == index]
        assert mine[0]["prompt_token_ids"] == [5, 6, 7]
        assert all("prompt_token_ids" not in c for c in mine[1:])
        assert sum(len(c["token_ids"]) for c in mine) == 4


def test_an_echo_with_max_tokens_0_bills_no_completion_token(scripted_stack):
    gateway, _, _ = scripted_stack
    reply = _post(gateway, "/v1/completions", {"model": MODEL, "prompt": "hello", "max_tokens": 0, "echo": True})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["text"] == "hello"
    assert reply.json()["usage"]["completion_tokens"] == 0


def test_a_stop_token_id_outside_the_vocabulary_is_refused_by_name(scripted_stack):
    gateway, _, tokenizer = scripted_stack
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2, "stop_token_ids": [len(tokenizer) + 10**6]}
    error = _error(_post(gateway, "/v1/completions", body), 400)
    assert error["param"] == "stop_token_ids" and "outside the vocabulary" in error["message"]


def test_an_overlong_x_request_id_is_refused(scripted_stack):
    gateway, _, _ = scripted_stack
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    error = _error(_post(gateway, "/v1/completions", body, headers={"X-Request-Id": "r" * 5000}), 400)
    assert error["param"] == "X-Request-Id" and "at most 256" in error["message"]
    named = _post(gateway, "/v1/completions", body, headers={"X-Request-Id": "client-7"})
    assert named.status_code == 200 and named.json()["id"].endswith("client-7")


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_json_body_is_read_as_json_whatever_its_content_type(scripted_stack, content_type):
    gateway, _, _ = scripted_stack
    body = json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 1})
    headers = {"Content-Type": content_type} if content_type else {}
    reply = httpx.post(f"{gateway.url}/v1/completions", content=body, headers=headers, timeout=30)
    assert reply.status_code == 200, reply.text
    broken = httpx.post(f"{gateway.url}/v1/completions", content=body[:-1], headers=headers, timeout=30)
    assert broken.status_code == 400 and "JSON" in broken.json()["error"]["message"]


def test_a_body_shorter_than_its_content_length_times_out_with_408(scripted_stack, monkeypatch):
    gateway, _, _ = scripted_stack
    monkeypatch.setattr(gateway_app, "BODY_TIMEOUT_S", 0.5)
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"model\":")
        reply = b""
        while b"}}" not in reply and (part := conn.recv(65536)):  # headers and body may come apart
            reply += part
    assert reply.startswith(b"HTTP/1.1 408") and b"did not arrive within 0.5 s" in reply


def test_an_image_part_is_refused_by_its_type(scripted_stack):
    gateway, _, _ = scripted_stack
    body = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}
    error = _error(_post(gateway, "/v1/chat/completions", body), 400)
    assert "content part type 'image_url' is not supported" in error["message"]


@pytest.mark.parametrize("extra, words", [
    ({"metadata": {"k" * 65: "v"}}, "at most 64 characters"),
    ({"metadata": {"k": "v" * 513}}, "at most 512 characters"),
    ({"metadata": {str(i): "v" for i in range(17)}}, "at most 16 items"),
    ({"include": ["reasoning.encrypted_content"]}, "include 'reasoning.encrypted_content' is not supported"),
])
def test_responses_metadata_limits_and_include_are_named(scripted_stack, extra, words):
    gateway, _, _ = scripted_stack
    error = _error(_post(gateway, "/v1/responses", {"model": MODEL, "input": "hi", **extra}), 400)
    assert words in error["message"]


@pytest.mark.parametrize("path, extra, param", [
    ("/v1/completions", {"max_tokens": True}, "max_tokens"),
    ("/v1/completions", {"max_tokens": "2"}, "max_tokens"),
    ("/v1/completions", {"n": True}, "n"),
    ("/v1/completions", {"stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": [True]}, "prompt"),
    ("/v1/completions", {"stop_token_ids": [True]}, "stop_token_ids"),
    ("/v1/completions", {"ignore_eos": 1}, "ignore_eos"),
    ("/v1/chat/completions", {"logprobs": "true"}, "logprobs"),
    ("/v1/chat/completions", {"temperature": "0.5"}, "temperature"),
    ("/v1/responses", {"max_output_tokens": "8"}, "max_output_tokens"),
])
def test_no_value_is_coerced_across_json_kinds(scripted_stack, path, extra, param):
    gateway, _, _ = scripted_stack
    base = {"/v1/completions": {"prompt": "x", "max_tokens": 1}, "/v1/responses": {"input": "hi"},
            "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}}[path]
    error = _error(_post(gateway, path, {"model": MODEL, **base, **extra}), 400)
    assert error["param"].split(".")[0] == param


def test_integral_floats_and_integer_floats_still_pass(scripted_stack):
    gateway, _, _ = scripted_stack
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2.0, "temperature": 1, "logit_bias": {"5": 1}}
    assert _post(gateway, "/v1/completions", body).status_code == 200


def test_a_body_that_is_not_utf8_is_named_so(scripted_stack):
    gateway, _, _ = scripted_stack
    body = b'{"model": "' + MODEL.encode() + b'", "prompt": "\xff\xfe", "max_tokens": 1}'
    reply = httpx.post(f"{gateway.url}/v1/completions", content=body, headers={"Content-Type": "application/json"},
                       timeout=30)
    error = _error(reply, 400)
    assert "not valid UTF-8" in error["message"] and error["code"] == "invalid_encoding"


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 5, "ignore_eos": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "ignore_eos": True}),
])
def test_continuous_usage_stats_puts_each_choice_usage_so_far_on_every_chunk(scripted_stack, path, body):
    gateway, _, _ = scripted_stack
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = _events(_post(gateway, path, {"model": MODEL, **body, "stream": True, "stream_options": options}))
    *choices, final = chunks
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == 5
    done = [c["usage"]["completion_tokens"] for c in choices]
    assert done == sorted(done) and done[-1] == 5
    assert all(c["usage"]["prompt_tokens"] == final["usage"]["prompt_tokens"] for c in choices)
    assert all(c["usage"]["total_tokens"] == c["usage"]["prompt_tokens"] + c["usage"]["completion_tokens"]
               for c in choices)
    plain = _events(_post(gateway, path, {"model": MODEL, **body, "stream": True}))
    assert all("usage" not in c for c in plain)
    alone = {"continuous_usage_stats": True}  # vLLM: only together with include_usage
    assert all("usage" not in c for c in _events(_post(gateway, path, {"model": MODEL, **body, "stream": True,
                                                                         "stream_options": alone})))


def test_a_chat_stream_with_return_token_ids_names_the_prompt_ids_on_its_first_chunk(scripted_stack):
    gateway, _, _ = scripted_stack
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "return_token_ids": True}
    whole = _post(gateway, "/v1/chat/completions", body).json()["choices"][0]
    first, *rest = [c["choices"][0] for c in _events(_post(gateway, "/v1/chat/completions", {**body, "stream": True}))]
    assert first["prompt_token_ids"] == whole["prompt_token_ids"] and first["delta"]["role"] == "assistant"
    assert all("prompt_token_ids" not in c for c in rest)


def test_a_responses_image_part_is_refused_by_its_type(scripted_stack):
    gateway, _, _ = scripted_stack
    item = {"type": "message", "role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}
    error = _error(_post(gateway, "/v1/responses", {"model": MODEL, "input": [item]}), 400)
    assert "content part type 'input_image' is not supported" in error["message"]


def test_a_stop_string_inside_a_merged_chunk_counts_the_tokens_up_to_it():
    """A worker merges a lagging stream's tokens into one chunk; the stop string's token is still
    the last one counted (vLLM's count), whatever came after it in the chunk."""
    from types import SimpleNamespace

    from checkpoints import demo_tokenizer
    from splitserve.services.gateway.completion import ChoiceStream
    from splitserve.services.gateway.config import RequestLimits
    from splitserve.services.gateway.prepare import PrepareContext, prepare_completion
    from splitserve.services.gateway.request_models import CompletionRequest

    tokenizer = demo_tokenizer()
    ids = tokenizer.encode(" alpha beta gamma delta", add_special_tokens=False)
    upto = next(n for n in range(1, len(ids) + 1) if "beta" in tokenizer.decode(ids[:n]))
    assert upto < len(ids)
    prep = prepare_completion(CompletionRequest(model="m", prompt="x", stop=["beta"], logprobs=0),
                              PrepareContext(tokenizer, 256, RequestLimits(), 8))
    stream = ChoiceStream(0, prep, prep.prompts[0], tokenizer, None, None)
    chunk = SimpleNamespace(token_ids=ids, finish_reason=None, logprobs=[-0.5] * len(ids), top_logprobs=None,
                            num_cache_hit_tokens=0, prompt_logprobs=None, stop_token_id=None)
    delta = stream._delta(chunk)
    assert delta.finish_reason == "stop" and delta.text == " alpha "
    assert delta.num_tokens == upto == len(delta.token_ids) == len(delta.logprobs)
