"""The gateway end to end against SCRIPTED workers: real uvicorn, real HTTP, real gRPC servers.

The workers here are scripted (tests/services/scripted_worker.py), not engines: these tests
check gateway behaviour only: SSE framing, detokenization and stop strings through the pipeline,
n > 1, logprob formats, usage, admission (429), and that cancellation and worker death reach the
workers (Generate cancelled, Abort on the prefill instance) and end the stream cleanly.
"""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from checkpoints import demo_tokenizer
from scripted_worker import (
    BackgroundLoop, GatewayServer, Script, start_scripted_worker, stop_scripted_worker, wait_until)
from splitserve.services.gateway.app import build_app
from splitserve.services.gateway.config import GatewayConfig

MODEL = "splitserve-demo"
TEXT = "def main():\n    return 42  # the answer, STOP here please, then more text"


@pytest.fixture(scope="module")
def loop():
    bg = BackgroundLoop()
    yield bg
    bg.close()


@pytest.fixture(scope="module")
def tokenizer():
    return demo_tokenizer()


class Stack:
    """Scripted workers + a gateway in front of them."""

    def __init__(self, loop, tokenizer, *, prefill=(), decode=(), colocated=(), **config) -> None:
        self.loop = loop
        self.workers = {}
        urls = {"prefill": [], "decode": [], "colocated": []}
        for role, scripts in (("prefill", prefill), ("decode", decode), ("colocated", colocated)):
            for i, script in enumerate(scripts):
                worker, url = loop.call(lambda r=role, s=script, n=f"{role}{i}": start_scripted_worker(r, s, n))
                self.workers[f"{role}{i}"] = worker
                urls[role].append(url)
        cfg = GatewayConfig(model_dir="/nonexistent", served_model_name=MODEL, prefill_urls=tuple(urls["prefill"]),
                            decode_urls=tuple(urls["decode"]), worker_urls=tuple(urls["colocated"]),
                            load_poll_interval_s=0.1, load_rpc_timeout_s=0.5, **config)
        self.gateway = GatewayServer(loop, build_app(cfg, tokenizer=tokenizer))
        self.http = httpx.Client(base_url=self.gateway.url, timeout=10)

    def close(self) -> None:
        self.http.close()
        self.gateway.stop()
        for worker in self.workers.values():
            self.loop.call(lambda w=worker: stop_scripted_worker(w))


@pytest.fixture
def make_stack(loop, tokenizer):
    stacks = []

    def make(**kw) -> Stack:
        stacks.append(Stack(loop, tokenizer, **kw))
        return stacks[-1]

    yield make
    for stack in stacks:
        stack.close()


def _sse_events(resp: httpx.Response) -> list:
    """Parse an SSE body, checking the framing: every event is `data: ...` + blank line, [DONE] last."""
    body = resp.text
    assert body.endswith("data: [DONE]\n\n"), body[-200:]
    events = body.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    assert events.count("data: [DONE]") == 1
    return [json.loads(e[len("data: "):]) for e in events[:-1]]


def _tokens(tokenizer, text=TEXT) -> list[int]:
    return list(tokenizer.encode(text))


def test_disaggregated_completion_whole_response(make_stack, tokenizer):
    tokens = _tokens(tokenizer)
    stack = make_stack(prefill=[Script(tokens)], decode=[Script(tokens)])
    resp = stack.http.post("/v1/completions", json={"model": MODEL, "prompt": "hello there", "max_tokens": 5})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "text_completion" and body["model"] == MODEL
    [choice] = body["choices"]
    assert choice["text"] == tokenizer.decode(tokens[:5]) and choice["finish_reason"] == "length"
    prompt_len = len(tokenizer.encode("hello there"))
    assert body["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": 5, "total_tokens": prompt_len + 5,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    prefill, decode = stack.workers["prefill0"].record, stack.workers["decode0"].record
    [gen] = decode.generates
    assert gen.HasField("kv_handle") and gen.kv_handle.instance_id == "prefill0"
    assert gen.first_token.token_id == tokens[0] and gen.request_id == prefill.prefills[0].request_id
    assert list(gen.prompt_token_ids) == list(prefill.prefills[0].prompt_token_ids)
    assert prefill.aborts == []  # the decode took the KV: nothing to free


def test_stream_framing_usage_chunk_and_stop_string(make_stack, tokenizer):
    tokens = _tokens(tokenizer)
    stack = make_stack(prefill=[Script(tokens)], decode=[Script(tokens, delay_s=0.01)])
    resp = stack.http.post("/v1/completions", json={
        "model": MODEL, "prompt": "x y z", "max_tokens": 100, "stream": True, "stop": ["STOP"],
        "stream_options": {"include_usage": True}})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = _sse_events(resp)
    *chunks, usage = events
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == TEXT[: TEXT.index("STOP")]
    assert all("STOP" not in c["choices"][0]["text"] for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "stop"
    assert chunks[-1]["choices"][0]["stop_reason"] == "STOP"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] < len(tokens)
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + usage["usage"]["completion_tokens"]
    # Generation stopped at the stop string: the decode call was cancelled on the worker.
    decode = stack.workers["decode0"].record
    wait_until(lambda: decode.cancelled == [decode.generates[0].request_id], 30, "decode cancellation")


def test_colocated_chat_n2_with_logprobs(make_stack, tokenizer):
    tokens = _tokens(tokenizer, "Hi! Ünïcödé 🙂 ok")
    stack = make_stack(colocated=[Script(tokens)])
    resp = stack.http.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hey"}], "n": 2, "logprobs": True,
        "top_logprobs": 2, "max_completion_tokens": 50})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "chat.completion" and [c["index"] for c in body["choices"]] == [0, 1]
    for choice in body["choices"]:
        assert choice["message"] == {"role": "assistant", "content": "Hi! Ünïcödé 🙂 ok"}
        content = choice["logprobs"]["content"]
        assert len(content) == len(tokens)
        assert all(e["logprob"] == -0.5 and len(e["top_logprobs"]) == 2 for e in content)
        assert b"".join(bytes(e["bytes"]) for e in content).decode("utf-8", "replace").startswith("Hi!")
    generates = stack.workers["colocated0"].record.generates
    assert len({g.request_id for g in generates}) == 2 and not any(g.HasField("kv_handle") for g in generates)
    assert all(g.sampling_params.logprobs == 2 for g in generates)
    assert body["usage"]["completion_tokens"] == 2 * len(tokens)


def test_completion_logprobs_format_and_chat_stream_roles(make_stack, tokenizer):
    tokens = _tokens(tokenizer, "alpha beta gamma")
    stack = make_stack(colocated=[Script(tokens)])
    body = stack.http.post("/v1/completions", json={
        "model": MODEL, "prompt": [1, 2, 3], "logprobs": 1, "max_tokens": 3}).json()
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 3
    assert "".join(lp["tokens"]) == body["choices"][0]["text"]
    assert lp["text_offset"] == [0, len(lp["tokens"][0]), len(lp["tokens"][0]) + len(lp["tokens"][1])]
    assert all(lp["tokens"][i] in lp["top_logprobs"][i] for i in range(3))

    events = _sse_events(stack.http.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hey"}], "stream": True}))
    assert events[0]["object"] == "chat.completion.chunk"
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in e["choices"][0]["delta"] for e in events[1:])
    assert "".join(e["choices"][0]["delta"]["content"] for e in events) == "alpha beta gamma"
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_client_disconnect_mid_decode_cancels_the_worker_stream(make_stack, tokenizer):
    tokens = _tokens(tokenizer)
    stack = make_stack(prefill=[Script(tokens)], decode=[Script(tokens, delay_s=0.5)])
    decode = stack.workers["decode0"].record
    with stack.http.stream("POST", "/v1/completions",
                           json={"model": MODEL, "prompt": "abc", "max_tokens": 50, "stream": True}) as resp:
        assert resp.status_code == 200
        # Keep the line iterator referenced: dropping it closes the connection (an early hang-up).
        lines = resp.iter_lines()
        assert next(lines).startswith("data: {")  # the prefill's first token
        wait_until(lambda: len(decode.generates) == 1, 30, "the decode worker to get the request")
    wait_until(lambda: len(decode.cancelled) == 1, 30, "the decode worker to see the cancellation")
    assert decode.completed == [] and decode.cancelled == [decode.generates[0].request_id]


def test_client_disconnect_during_prefill_aborts_the_held_kv(make_stack, tokenizer):
    tokens = _tokens(tokenizer)
    stack = make_stack(prefill=[Script(tokens, prefill_delay_s=30.0)], decode=[Script(tokens)])
    prefill = stack.workers["prefill0"].record

    def hang_up_early():
        with stack.http.stream("POST", "/v1/completions",
                               json={"model": MODEL, "prompt": "abc", "max_tokens": 50, "stream": True}):
            wait_until(lambda: len(prefill.prefills) == 1, 30, "prefill to start")

    hang_up_early()
    wait_until(lambda: len(prefill.aborts) == 1, 30, "Abort to reach the prefill worker")
    assert prefill.aborts == [prefill.prefills[0].request_id]
    assert stack.workers["decode0"].record.generates == []


def test_decode_worker_death_mid_stream_is_an_sse_error_and_the_gateway_recovers(make_stack, tokenizer):
    tokens = _tokens(tokenizer)
    # decode0 reports less load, so it is chosen first; it dies after streaming 3 tokens.
    stack = make_stack(prefill=[Script(tokens)],
                       decode=[Script(tokens, delay_s=0.01, die_after_tokens=3), Script(tokens, num_running=5)])
    dying = stack.workers["decode0"]
    resp = stack.http.post("/v1/completions", json={"model": MODEL, "prompt": "abc", "max_tokens": 20, "stream": True})
    assert resp.status_code == 200
    *chunks, last = _sse_events(resp)
    assert len(dying.record.generates) == 1 and stack.workers["decode1"].record.generates == []
    assert "".join(c["choices"][0]["text"] for c in chunks) == tokenizer.decode(tokens[:3])[: len(
        "".join(c["choices"][0]["text"] for c in chunks))]
    assert last["error"]["type"] == "service_unavailable" and "a worker failed" in last["error"]["message"]
    assert "127.0.0.1" not in last["error"]["message"]  # no internal address reaches the client
    health = stack.http.get("/health")
    assert health.status_code == 200  # prefill0 + decode1 still make a pair
    assert {w["role"] + str(w["healthy"]) for w in health.json()["workers"]} == {"prefillTrue", "decodeTrue",
                                                                                "decodeFalse"}
    ok = stack.http.post("/v1/completions", json={"model": MODEL, "prompt": "abc", "max_tokens": 5})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == tokenizer.decode(tokens[:5])
    assert len(stack.workers["decode1"].record.generates) == 1


def test_decode_worker_death_without_a_replacement_is_503(make_stack, tokenizer):
    tokens = _tokens(tokenizer)
    stack = make_stack(prefill=[Script(tokens)], decode=[Script(tokens, delay_s=0.01, die_after_tokens=2)])
    resp = stack.http.post("/v1/completions", json={"model": MODEL, "prompt": "abc", "max_tokens": 20})
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "service_unavailable"
    assert stack.http.get("/health").status_code == 503
    again = stack.http.post("/v1/completions", json={"model": MODEL, "prompt": "abc", "max_tokens": 20})
    assert again.status_code == 503 and "no healthy decode worker" in again.json()["error"]["message"]
    assert "127.0.0.1" not in again.text


def test_admission_full_is_429_with_retry_after(make_stack, tokenizer):
    tokens = _tokens(tokenizer)
    stack = make_stack(colocated=[Script(tokens, delay_s=0.05)], max_inflight_requests=1, max_queued_requests=0,
                       retry_after_s=7)
    started = threading.Event()

    def slow_stream():
        with stack.http.stream("POST", "/v1/completions",
                               json={"model": MODEL, "prompt": "a", "max_tokens": 50, "stream": True}) as resp:
            started.set()
            for _ in resp.iter_lines():
                pass

    holder = threading.Thread(target=slow_stream, daemon=True)
    holder.start()
    assert started.wait(5)
    resp = stack.http.post("/v1/completions", json={"model": MODEL, "prompt": "b", "max_tokens": 2})
    assert resp.status_code == 429 and resp.headers["retry-after"] == "7"
    assert resp.json()["error"]["code"] == "rate_limit_exceeded"
    holder.join(timeout=30)
    assert stack.http.post("/v1/completions", json={"model": MODEL, "prompt": "b", "max_tokens": 2}).status_code == 200


def test_metrics_report_tokens_and_kv_bytes(make_stack, tokenizer):
    tokens = _tokens(tokenizer)
    stack = make_stack(prefill=[Script(tokens)], decode=[Script(tokens)])
    assert stack.http.post("/v1/completions", json={"model": MODEL, "prompt": "abc", "max_tokens": 4}).status_code == 200
    text = stack.http.get("/metrics").text
    assert "splitserve_gateway_kv_transfer_bytes_total 4096.0" in text
    assert "splitserve_gateway_generation_tokens_total 4.0" in text
    assert "splitserve_gateway_time_to_first_token_seconds_count 1.0" in text
    assert 'splitserve_gateway_healthy_workers{role="decode"} 1.0' in text


def test_the_openai_client_understands_the_gateway(make_stack, tokenizer):
    openai = pytest.importorskip("openai")
    tokens = _tokens(tokenizer, "hello from the scripted worker")
    stack = make_stack(prefill=[Script(tokens)], decode=[Script(tokens)])
    client = openai.OpenAI(base_url=stack.gateway.url + "/v1", api_key="unused", max_retries=0, timeout=10)
    completion = client.completions.create(model=MODEL, prompt="hi", max_tokens=3, logprobs=2)
    assert completion.choices[0].text == tokenizer.decode(tokens[:3])
    assert completion.usage.completion_tokens == 3 and len(completion.choices[0].logprobs.tokens) == 3
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True,
                                            stream_options={"include_usage": True})
    parts = [chunk for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in parts if c.choices) == "hello from the scripted worker"
    assert parts[-1].usage.completion_tokens == len(tokens)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=-1)
    assert [m.id for m in client.models.list().data] == [MODEL]


def _post_then_hang_up(url: str, body: dict, until) -> None:
    """POST a non-streaming request on a raw socket, wait for `until()`, then close the connection."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    payload = json.dumps(body).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {parts.hostname}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode()
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(head + payload)
        until()


def test_non_streaming_client_hang_up_mid_decode_cancels_the_worker_stream(make_stack, tokenizer):
    tokens = _tokens(tokenizer)
    stack = make_stack(prefill=[Script(tokens)], decode=[Script(tokens, delay_s=0.5)])
    decode = stack.workers["decode0"].record
    _post_then_hang_up(stack.gateway.url, {"model": MODEL, "prompt": "abc", "max_tokens": 50},
                       lambda: wait_until(lambda: len(decode.generates) == 1, 30, "the decode worker to get it"))
    wait_until(lambda: len(decode.cancelled) == 1, 30, "the decode worker to see the cancellation")
    assert decode.completed == [] and decode.cancelled == [decode.generates[0].request_id]


def test_non_streaming_client_hang_up_during_prefill_aborts_the_held_kv(make_stack, tokenizer):
    tokens = _tokens(tokenizer)
    stack = make_stack(prefill=[Script(tokens, prefill_delay_s=30.0)], decode=[Script(tokens)])
    prefill = stack.workers["prefill0"].record
    _post_then_hang_up(stack.gateway.url, {"model": MODEL, "prompt": "abc", "max_tokens": 50},
                       lambda: wait_until(lambda: len(prefill.prefills) == 1, 30, "prefill to start"))
    wait_until(lambda: len(prefill.aborts) == 1, 30, "Abort to reach the prefill worker")
    assert prefill.aborts == [prefill.prefills[0].request_id]
    assert stack.workers["decode0"].record.generates == []


def test_n_choices_with_a_seed_get_seed_plus_k(make_stack, tokenizer):
    """Each choice is its own worker request; choice k of each prompt carries seed + k (the offline
    API's rule), so the n choices differ and each reproduces."""
    tokens = _tokens(tokenizer)
    stack = make_stack(colocated=[Script(tokens)])
    resp = stack.http.post("/v1/completions", json={"model": MODEL, "prompt": ["a", "b"], "n": 3, "seed": 2**63 - 2,
                                                     "max_tokens": 2})
    assert resp.status_code == 200, resp.text
    generates = stack.workers["colocated0"].record.generates
    seeds = sorted(g.sampling_params.seed for g in generates)
    assert seeds == sorted([2**63 - 2, 2**63 - 1, -(2**63)] * 2)  # wrapped into int64


def test_the_decode_call_goes_out_before_the_first_token_is_handed_on(loop, tokenizer):
    """The hand-off does not wait for the consumer: while it still holds the prefill's first token
    (it has not asked for the next one), the decode worker already has the Generate; the stream
    then goes on with the decode side's tokens, and closing it early cancels the decode call."""
    from splitserve.services.gateway.dispatch import Dispatcher
    from splitserve.services.gateway.metrics import GatewayMetrics
    from splitserve.services.gateway.router import Router, poll_once
    from splitserve.services.gateway.worker_client import WorkerClient, WorkerRequest
    from splitserve.shared.sampling_params import SamplingParams

    tokens = _tokens(tokenizer)
    prefill, p_url = loop.call(lambda: start_scripted_worker("prefill", Script(tokens), "prefill0"))
    decode, d_url = loop.call(lambda: start_scripted_worker("decode", Script(tokens, delay_s=0.05), "decode0"))
    router = Router([p_url], [d_url])

    async def make_clients():  # their channels belong to the loop they serve on
        return {url: WorkerClient(url) for url in (p_url, d_url)}

    clients = loop.call(make_clients)
    dispatcher = Dispatcher(router, clients, GatewayMetrics(), prefill_timeout_s=10, generate_timeout_s=30,
                            abort_timeout_s=5)
    loop.call(lambda: poll_once(router, clients, 5.0))
    chunks = dispatcher.generate(WorkerRequest("handoff-1", tokens[:4], SamplingParams(max_tokens=20)))
    try:
        first = loop.call(lambda: anext(chunks))
        assert first.token_ids == [tokens[0]]
        wait_until(lambda: len(decode.record.generates) == 1, 30, "the Generate to reach the decode worker")
        assert decode.record.generates[0].first_token.token_id == tokens[0]
        second = loop.call(lambda: anext(chunks))
        assert second.token_ids[0] == tokens[1]
    finally:
        loop.call(chunks.aclose)
    wait_until(lambda: decode.record.cancelled == ["handoff-1"], 30, "the decode call to be cancelled")
    assert prefill.record.aborts == []  # the decode side took the KV
    for client in clients.values():
        loop.call(client.close)
    for worker in (prefill, decode):
        loop.call(lambda w=worker: stop_scripted_worker(w))
