"""Fuzzing the real stack (`splitserve up`, colocated and disaggregated) through HTTP.

- schemathesis over the gateway's own /openapi.json, valid and invalid bodies, with the model
  name fixed (so valid requests reach the engine) and max_tokens kept small (so they finish);
- hypothesis over combinations of every sampling field, at and inside the edges of its range,
  streamed and not, completions and chat;
- n + seed over HTTP: distinct choices that reproduce; a client that hangs up on a
  non-streaming request gives its blocks back.

After each: no 5xx (no SSE error event either), no worker exited, every KV pool full again.
Both stacks need the API key (one given as --api-key, one as SPLITSERVE_API_KEY).
"""

from __future__ import annotations

import copy
import json
import socket

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from stack import LocalStack, all_up, wait_until
from splitserve.shared.sampling_params import INT32_MAX, INT64_MAX, INT64_MIN

pytestmark = pytest.mark.slow

MODEL = "splitserve-demo"
KEY = "sk-fuzz-key"
MAX_TOKENS = 6
GATEWAY_LIMITS = ["--max-n", "2", "--max-prompts-per-request", "2"]


def fuzz(max_examples: int) -> settings:
    return settings(max_examples=max_examples, deadline=None, phases=[Phase.generate],
                    suppress_health_check=list(HealthCheck), database=None)


class FuzzedStack:
    def __init__(self, stack: LocalStack, roles: list[str]) -> None:
        self.stack, self.roles = stack, roles
        self.pids = {role: stack.worker_pid(role) for role in roles}
        self.http = httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)

    def post(self, path: str, body: dict) -> httpx.Response:
        return self.http.post(path, json=body)

    def assert_healthy_and_idle(self) -> None:
        """No worker exited or restarted, and every worker is idle with its whole KV pool free."""
        assert {role: self.stack.worker_pid(role) for role in self.roles} == self.pids
        for role in self.roles:
            def idle(role=role):
                load = self.stack.load(role)
                return load.num_running == load.num_waiting == 0 and load.num_free_blocks == load.num_total_blocks
            wait_until(idle, 60, message=f"{role} idle with every block free")


TOPOLOGIES = {  # name: (`splitserve up` flags, environment, worker roles)
    "colocated": (["--colocated", "--api-key", KEY], {}, ["worker"]),
    "disaggregated": (["--prefill", "1", "--decode", "1"], {"SPLITSERVE_API_KEY": KEY}, ["prefill", "decode"]),
}


@pytest.fixture(scope="module")
def fuzzed_stacks(tmp_path_factory):
    """Both topologies' stacks, started at once so that their start-ups overlap (each test runs on
    each of them in turn; the other one idles meanwhile)."""
    cache = str(tmp_path_factory.mktemp("fuzz-cache"))
    stacks = [LocalStack([*args, *GATEWAY_LIMITS], cache, env=env) for args, env, _ in TOPOLOGIES.values()]
    with all_up(*stacks):
        fuzzed = {name: FuzzedStack(stack, roles) for (name, (_, _, roles)), stack in zip(TOPOLOGIES.items(), stacks)}
        yield fuzzed
        for one in fuzzed.values():
            one.http.close()


@pytest.fixture(scope="module", params=list(TOPOLOGIES))
def fuzzed(request, fuzzed_stacks):
    return fuzzed_stacks[request.param]


# ---- schemathesis --------------------------------------------------------------------------------

def _fuzzable_schema(schema: dict) -> dict:
    """The gateway's schema with `model` fixed and max_tokens small and required, so that valid
    cases reach the engine and end quickly (the full ranges are unit-tested)."""
    schema = copy.deepcopy(schema)
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        model = schema["components"]["schemas"][name]
        model["properties"]["model"] = {"type": "string", "enum": [MODEL]}
        model["properties"]["max_tokens"] = {"type": "integer", "minimum": 1, "maximum": MAX_TOKENS}
        model["properties"].pop("max_completion_tokens", None)
        model.setdefault("required", []).append("max_tokens")
    return schema


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
def test_schemathesis_finds_no_server_error(fuzzed, mode):
    schema = schemathesis.openapi.from_dict(_fuzzable_schema(fuzzed.http.get("/openapi.json").json()))
    statuses = []
    for path in ("/v1/completions", "/v1/chat/completions"):
        strategy = schema[path]["POST"].as_strategy(generation_mode=mode)

        @fuzz(10)
        @given(case=strategy)
        def call(case):
            response = case.call(base_url=fuzzed.stack.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
            assert response.status_code < 500, (case.body, response.status_code, response.text)
            _assert_no_stream_error(response.text)
            statuses.append(response.status_code)

        call()
    if mode == schemathesis.GenerationMode.POSITIVE:
        assert 200 in statuses and set(statuses) <= {200, 400}, statuses  # valid cases reached the engine
    else:
        assert set(statuses) <= {200, 400, 404}, statuses  # 404: a model name other than the served one
    fuzzed.assert_healthy_and_idle()


def _assert_no_stream_error(text: str) -> None:
    for line in text.splitlines():
        if line.startswith("data: {"):
            assert '"error"' not in line[:20], line


# ---- hypothesis over every sampling field --------------------------------------------------------

def _edges_and_inside(low, high, inner=None):
    values = [st.just(low), st.just(high)]
    return st.one_of(*values, inner if inner is not None else st.integers(low, high))


SAMPLING_FIELDS = {
    "temperature": st.one_of(st.just(0.0), st.floats(0.0, 5.0), st.just(1e-6), st.just(1e6)),
    "top_p": st.one_of(st.just(1.0), st.floats(1e-6, 1.0)),
    "top_k": _edges_and_inside(-1, INT32_MAX, st.integers(-1, 50)),
    "min_p": st.floats(0.0, 1.0),
    "seed": _edges_and_inside(INT64_MIN, INT64_MAX),
    "presence_penalty": st.floats(-2.0, 2.0),
    "frequency_penalty": st.floats(-2.0, 2.0),
    "repetition_penalty": st.one_of(st.just(1.0), st.floats(1e-3, 10.0), st.just(1e6)),
    "min_tokens": st.integers(0, MAX_TOKENS),
    "stop": st.one_of(st.text(min_size=1, max_size=4), st.lists(st.text(min_size=1, max_size=4), max_size=3)),
    "stop_token_ids": st.lists(_edges_and_inside(0, 4095, st.integers(0, 4095)), max_size=4),  # the vocabulary
    "ignore_eos": st.booleans(),
    "logit_bias": st.dictionaries(st.integers(0, 4095).map(str), st.floats(-100, 100), max_size=4),
    "skip_special_tokens": st.booleans(),
    "n": st.integers(1, 2),
    "priority": _edges_and_inside(-INT32_MAX - 1, INT32_MAX),
    "user": st.text(max_size=5),
}


@st.composite
def requests(draw):
    chat = draw(st.booleans())
    body = {"model": MODEL, "max_tokens": draw(st.integers(1, MAX_TOKENS)), "stream": draw(st.booleans())}
    body.update(draw(st.fixed_dictionaries({}, optional=SAMPLING_FIELDS)))
    if chat:
        body["messages"] = [{"role": "user", "content": draw(st.text(min_size=1, max_size=30))}]
        if draw(st.booleans()):
            body.update(logprobs=True, top_logprobs=draw(st.integers(0, 20)))
    else:
        body["prompt"] = draw(st.one_of(st.text(min_size=1, max_size=30),
                                        st.lists(st.integers(0, 4095), min_size=1, max_size=20),
                                        st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=2)))
        body["logprobs"] = draw(st.one_of(st.none(), st.integers(0, 20)))
    if body["stream"] and draw(st.booleans()):
        body["stream_options"] = {"include_usage": True}
    return ("/v1/chat/completions" if chat else "/v1/completions"), body


def test_every_sampling_field_combination_is_served(fuzzed):
    @fuzz(15)
    @given(request=requests())
    def call(request):
        path, body = request
        response = fuzzed.post(path, body)
        assert response.status_code in (200, 400), (body, response.status_code, response.text)
        if response.status_code == 400:
            # Only cross-field rules can refuse these bodies: min_tokens over max_tokens, and n > 1
            # with greedy sampling (temperature 0), which vLLM refuses too.
            greedy_n = body.get("n", 1) > 1 and body.get("temperature", 1.0) == 0
            assert body.get("min_tokens", 0) > body["max_tokens"] or greedy_n, (body, response.text)
        elif body["stream"]:
            _assert_no_stream_error(response.text)
            assert response.text.endswith("data: [DONE]\n\n")
        else:
            assert len(response.json()["choices"]) >= 1

    call()
    fuzzed.assert_healthy_and_idle()


# ---- n + seed, hang-up ---------------------------------------------------------------------------

def test_n_with_a_seed_gives_distinct_reproducible_choices(fuzzed):
    body = {"model": MODEL, "prompt": "def f(x):", "max_tokens": 8, "n": 2, "seed": 1234, "temperature": 1.0,
            "ignore_eos": True}

    def texts(**extra):
        response = fuzzed.post("/v1/completions", {**body, **extra})
        assert response.status_code == 200, response.text
        return [c["text"] for c in sorted(response.json()["choices"], key=lambda c: c["index"])]

    first = texts()
    assert first[0] != first[1]
    assert texts() == first  # reproducible
    assert texts(seed=1235)[0] == first[1]  # choice k has seed + k, as in the offline API


def test_a_non_streaming_client_that_hangs_up_gives_its_blocks_back(fuzzed):
    """The request would run to the context length; the hang-up cancels it on every worker."""
    payload = json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 2000, "ignore_eos": True}).encode()
    host, port = "127.0.0.1", int(fuzzed.stack.url.rsplit(":", 1)[1])
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n").encode()
    busy_role = fuzzed.roles[-1]  # the worker that decodes
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(head + payload)
        wait_until(lambda: fuzzed.stack.load(busy_role).num_running == 1, 60, message="the request to run")
    fuzzed.assert_healthy_and_idle()
    metrics = fuzzed.http.get("/metrics").text
    assert 'status="499"' in metrics  # the gateway saw the hang-up and cancelled, not completed
