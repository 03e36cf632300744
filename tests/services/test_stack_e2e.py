"""End to end through the `openai` client against `splitserve up` run as subprocesses.

One disaggregated stack (gateway + prefill + decode, KV over UCX on loopback TCP) and one
colocated stack serve the demo checkpoint; greedy output must be identical through both and
through the offline engine, KV bytes must really move (and nothing be recomputed), cancelled
streams must give every block back, and bad input must get 4xx in OpenAI's error format.
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from stack import LocalStack, all_up, metric_total, process_running, wait_until

pytestmark = pytest.mark.slow

PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n\nclass Config:", "x = [i * i for i in range(10)]",
           "The quick brown fox " * 6]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("stack-cache"))


@pytest.fixture(scope="module")
def stacks(cache_dir):
    """(disaggregated, colocated, NCCL-paired), started at once so that their start-ups overlap.
    The colocated one schedules asynchronously, so the identity test below also holds it against
    the synchronous paths. The last one serves only its own test. (The two-gateway stack is
    conftest.two_gateway_stack, shared with test_responses_store.py.)"""
    with all_up(LocalStack(["--prefill", "1", "--decode", "1"], cache_dir),
                LocalStack(["--colocated", "--async-scheduling"], cache_dir),
                LocalStack(["--prefill", "1", "--decode", "1", "--transfer-backend", "nccl",
                            "--worker-devices", "cpu,cpu"], cache_dir)) as three:
        yield three


@pytest.fixture(scope="module")
def disagg(stacks):
    return stacks[0]


@pytest.fixture(scope="module")
def colocated(stacks):
    return stacks[1]


def _greedy_texts(client, prompts=PROMPTS) -> list[str]:
    out = []
    for prompt in prompts:
        r = client.completions.create(model="splitserve-demo", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == MAX_TOKENS
        out.append(r.choices[0].text)
    return out


def test_models_health_and_fleet_metrics(disagg):
    assert [m.id for m in disagg.openai().models.list().data] == ["splitserve-demo"]
    assert httpx.get(f"{disagg.url}/health").status_code == 200
    metrics = httpx.get(f"{disagg.url}/metrics").text
    free = metric_total(metrics, 'splitserve_worker_free_kv_blocks{instance="decode-0",role="decode"}')
    assert free == disagg.load("decode").num_free_blocks > 0


def test_completion_and_chat_streaming_and_not(disagg):
    client = disagg.openai()
    r = client.completions.create(model="splitserve-demo", prompt="hello", max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop") and r.usage.prompt_tokens > 0
    chunks = list(client.completions.create(model="splitserve-demo", prompt="hello", max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    messages = [{"role": "user", "content": "Say something."}]
    chat = client.chat.completions.create(model="splitserve-demo", messages=messages, max_tokens=8, temperature=0,
                                          logprobs=True, top_logprobs=2)
    assert chat.choices[0].message.role == "assistant"
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in chat.choices[0].logprobs.content)
    stream = client.chat.completions.create(model="splitserve-demo", messages=messages, max_tokens=8, temperature=0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == chat.choices[0].message.content


def test_greedy_identical_disaggregated_colocated_offline(disagg, colocated, cache_dir):
    from splitserve.shared.demo import ensure_demo_checkpoint
    from splitserve.shared.llm import LLM
    from splitserve.shared.sampling_params import SamplingParams

    before = disagg.load("decode").counters
    via_disagg = _greedy_texts(disagg.openai())
    via_colocated = _greedy_texts(colocated.openai())
    llm = LLM(ensure_demo_checkpoint(cache_dir), device="cpu", num_blocks=512)
    offline = [o.outputs[0].text for o in llm.generate(
        PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))]
    assert via_disagg == via_colocated == offline
    # Disaggregation really happened: the decode side received KV for every request, none failed.
    after = disagg.load("decode").counters
    assert after["transfers_ok"] - before.get("transfers_ok", 0) == len(PROMPTS)
    assert after["bytes_received"] > before.get("bytes_received", 0)
    assert after.get("transfers_failed", 0) == before.get("transfers_failed", 0)


def test_kv_moved_and_nothing_recomputed_per_request(disagg):
    metrics = httpx.get(f"{disagg.url}/metrics").text
    moved = metric_total(metrics, "splitserve_gateway_kv_transfer_bytes_total")
    recomputed = metric_total(metrics, "splitserve_gateway_recomputed_tokens_total")
    r = disagg.openai().completions.create(model="splitserve-demo", prompt="tok " * 50, max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4
    metrics = httpx.get(f"{disagg.url}/metrics").text
    block_bytes = 4 * 2 * 16 * 4 * 32 * 4  # demo: layers x (K,V) x block x kv heads x head dim x fp32
    assert metric_total(metrics, "splitserve_gateway_kv_transfer_bytes_total") - moved >= 3 * block_bytes
    assert metric_total(metrics, "splitserve_gateway_recomputed_tokens_total") == recomputed


def test_32_concurrent_streams(disagg):
    async def one(client, i):
        stream = await client.completions.create(model="splitserve-demo", prompt=f"request {i}: ", max_tokens=12,
                                                 temperature=0.8, seed=i, stream=True,
                                                 extra_body={"ignore_eos": True})
        text, finish = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        return finish

    async def run():
        client = disagg.async_openai()
        return await asyncio.gather(*(one(client, i) for i in range(32)))

    assert asyncio.run(run()) == ["length"] * 32


def test_cancel_ten_streams_frees_every_block(disagg):
    free_before = {role: disagg.load(role).num_free_blocks for role in ("prefill", "decode")}

    async def cancel_midway(i):
        async with httpx.AsyncClient(timeout=60) as client:
            body = {"model": "splitserve-demo", "prompt": f"stream {i} " * 20, "max_tokens": 2000, "stream": True,
                    "ignore_eos": True}
            async with client.stream("POST", f"{disagg.url}/v1/completions", json=body) as response:
                assert response.status_code == 200
                received = 0
                async for line in response.aiter_lines():
                    received += line.startswith("data:")
                    if received >= 3:
                        return received  # leaving the block closes the connection mid-stream

    async def run():
        return await asyncio.gather(*(cancel_midway(i) for i in range(10)))

    assert all(n >= 3 for n in asyncio.run(run()))
    for role in ("prefill", "decode"):
        wait_until(lambda: disagg.load(role).num_free_blocks == free_before[role] and disagg.load(role).num_running == 0,
                   timeout_s=20, message=f"{role} pool back to {free_before[role]} free blocks")


@pytest.mark.parametrize("body, status", [
    ({"model": "splitserve-demo", "prompt": "x", "max_tokens": -1}, 400),
    ({"model": "splitserve-demo", "prompt": "x", "max_tokens": "many"}, 400),
    ({"model": "splitserve-demo", "prompt": "x", "temperature": -2}, 400),
    ({"model": "no-such-model", "prompt": "x"}, 404),
    ({"model": "splitserve-demo", "prompt": "x", "n": 1000}, 400),
    ({"model": "splitserve-demo", "prompt": "word " * 5000, "max_tokens": 4}, 400),
    ({"model": "splitserve-demo", "messages": "not a list"}, 400),
])
def test_bad_input_is_4xx_openai_error(disagg, body, status):
    endpoint = "chat/completions" if "messages" in body else "completions"
    r = httpx.post(f"{disagg.url}/v1/{endpoint}", json=body, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"]


def test_malformed_json_is_400(disagg):
    r = httpx.post(f"{disagg.url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()


def test_openai_client_sees_clear_errors(disagg):
    with pytest.raises(openai.BadRequestError, match="context|tokens"):
        disagg.openai().completions.create(model="splitserve-demo", prompt="word " * 5000, max_tokens=4)
    # The stack is still healthy after the errors.
    assert disagg.openai().completions.create(model="splitserve-demo", prompt="ok", max_tokens=2).usage.completion_tokens == 2


def test_nccl_backend_stack_serves_the_same_tokens_with_kv_moved(disagg, stacks):
    """`splitserve up --transfer-backend nccl --worker-devices cpu,cpu`: the launcher pairs the
    prefill (rank 0) and decode (rank 1) workers in one process group (gloo stands in for NCCL on
    CPU tensors); the output is the UCX stack's, KV really moves and nothing is recomputed. Workers
    go where --worker-devices says."""
    nccl = stacks[2]
    assert _greedy_texts(nccl.openai()) == _greedy_texts(disagg.openai())
    metrics = httpx.get(f"{nccl.url}/metrics").text
    assert metric_total(metrics, "splitserve_gateway_kv_transfer_bytes_total") > 0
    assert metric_total(metrics, "splitserve_gateway_recomputed_tokens_total") == 0
    for role, rank in (("prefill", "0"), ("decode", "1")):
        with open(f"/proc/{nccl.worker_pid(role)}/cmdline") as f:
            argv = f.read().split("\0")
        assert argv[argv.index("--transfer-nccl-rank") + 1] == rank
        assert argv[len(argv) - 1 - argv[::-1].index("--device") + 1] == "cpu"  # the last --device wins


def test_nccl_backend_needs_one_prefill_and_one_decode(cache_dir):
    with pytest.raises(RuntimeError, match="pairs exactly one prefill and one decode"):
        with LocalStack(["--prefill", "2", "--decode", "1", "--transfer-backend", "nccl"], cache_dir):
            pass



def test_several_gateway_processes_share_the_port_and_add_up_their_metrics(colocated, two_gateway_stack):
    """`splitserve up --gateway-processes 2 --session-window 0`: both processes answer on the one
    port (the kernel spreads new connections), the tokens are the single gateway's, and /metrics,
    whichever process answers it, counts the tokens that both served (from the total before this
    test's requests: test_responses_store.py may have used the stack first, nothing runs on it
    meanwhile). The session credit is off here (window 0), so that path serves real traffic too.
    Stopping the stack stops every gateway process."""
    multi = two_gateway_stack()
    with multi:  # stops it at the end (the fixture's stop then finds it stopped)
        pids = {httpx.get(f"{multi.url}/health").json()["pid"] for _ in range(40)}  # a new connection each
        assert len(pids) == 2
        before = _generated_tokens_seen_by_each(multi)
        assert len(before) == 1, before
        for pid in pids:
            with open(f"/proc/{pid}/cmdline") as f:
                argv = f.read().split("\0")
            assert argv[argv.index("--session-window") + 1] == "0"
        assert _greedy_texts(multi.openai()) == _greedy_texts(colocated.openai())

        async def one_stream(prompt: str) -> int:
            async with multi.async_openai() as client:  # its own connection
                stream = await client.completions.create(model="splitserve-demo", prompt=prompt, max_tokens=MAX_TOKENS,
                                                         temperature=0, stream=True, extra_body={"ignore_eos": True})
                return sum([1 async for chunk in stream if chunk.choices and chunk.choices[0].text])

        async def streams():
            return await asyncio.gather(*(one_stream(p) for p in PROMPTS * 3))

        assert all(n > 0 for n in asyncio.run(streams()))
        expected = before.pop() + MAX_TOKENS * len(PROMPTS) * 4  # the greedy requests above and the streams
        assert _generated_tokens_seen_by_each(multi) == {expected}
    assert not any(process_running(pid) for pid in pids)


def _generated_tokens_seen_by_each(stack) -> set[float]:
    """The generation token totals /metrics reports over ten new connections (both processes answer some)."""
    return {metric_total(httpx.get(f"{stack.url}/metrics").text, "splitserve_gateway_generation_tokens_total")
            for _ in range(10)}
