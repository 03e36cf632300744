"""A bad day in production, against the real stack: a decode process killed mid-stream, a KV
transfer from a prefill instance that never answers, a worker killed before the gateway noticed.
(A worker whose engine dies: tests/services/test_worker_process.py.)"""

from __future__ import annotations

import os
import signal
import socket

import httpx
import openai
import pytest

from stack import LocalStack, metric_total, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    # Short transfer timeout so the unanswered-transfer test ends quickly.
    args = ["--prefill", "1", "--decode", "1", "--transfer-timeout-s", "3"]
    with LocalStack(args, str(tmp_path_factory.mktemp("fail-cache"))) as s:
        yield s


def test_transfer_from_silent_prefill_times_out_and_recomputes(stack):
    """Decode is handed a KV handle whose prefill never answers: the load fails within the
    timeout, the decode side recomputes the prompt, the request completes, and no block leaks."""
    from splitserve.shared.grpc_channel import sync_channel
    from splitserve.shared.protocol import worker_pb2 as pb
    from splitserve.shared.protocol import worker_pb2_grpc as pb_grpc

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()  # accepts TCP, never speaks ZMQ
    free_before = stack.load("decode").num_free_blocks
    real = stack.load("prefill")
    prompt = list(range(10, 60))
    handle = pb.KvHandle(version=1, instance_id=real.instance_id, request_id="silent-1", block_ids=[1, 2, 3, 4],
                         num_tokens=len(prompt), layout_hash=_layout_hash(stack),
                         control_address=f"tcp://127.0.0.1:{silent.getsockname()[1]}")
    request = pb.GenerateRequest(
        request_id="silent-1", prompt_token_ids=prompt,
        sampling_params=pb.SamplingParams(temperature=0, top_p=1, repetition_penalty=1, max_tokens=6, ignore_eos=True),
        kv_handle=handle, first_token=pb.FirstToken(token_id=42, logprob=-1.0, rank=1))
    with sync_channel(stack.worker_address("decode"), security=stack.security()) as channel:
        chunks = list(pb_grpc.WorkerStub(channel).Generate(request, timeout=60))
    silent.close()
    final = chunks[-1]
    assert final.finish_reason == "length"
    assert sum(len(c.token_ids) for c in chunks) == 5  # the first token came with the handle
    assert final.stats.kv_bytes_received == 0
    assert final.stats.num_recomputed_tokens == len(prompt)
    wait_until(lambda: stack.load("decode").num_free_blocks == free_before, 10, message="decode pool restored")
    assert stack.load("decode").counters.get("transfers_failed", 0) >= 1


def test_decode_killed_mid_stream(stack):
    client = stack.openai(timeout=60)
    pid = stack.worker_pid("decode")
    stream = client.completions.create(model="splitserve-demo", prompt="long story " * 10, max_tokens=1900,
                                       stream=True, extra_body={"ignore_eos": True})
    with pytest.raises(openai.APIError) as excinfo:
        for i, chunk in enumerate(stream):
            if i == 3:
                os.kill(pid, signal.SIGKILL)
    assert "decode" in str(excinfo.value).lower() or "worker" in str(excinfo.value).lower()
    assert httpx.get(f"{stack.url}/health", timeout=5).status_code in (200, 503)
    # The launcher restarts the decode worker; requests succeed again once it is back.

    def succeeds():
        try:
            r = client.completions.create(model="splitserve-demo", prompt="after", max_tokens=3)
            return r.usage.completion_tokens == 3
        except openai.APIError:
            return False

    wait_until(succeeds, timeout_s=120, interval_s=1.0, message="a request served after the decode restart")
    assert stack.worker_pid("decode") != pid
    assert httpx.get(f"{stack.url}/health", timeout=5).status_code == 200
    # The prefill side freed the blocks it held for the killed request (its lease or the abort).
    wait_until(lambda: stack.load("prefill").num_running == 0 and stack.load("prefill").kv_usage == 0.0, 60,
               message="prefill pool empty")


def _layout_hash(stack) -> str:
    """The decode worker's own layout hash (what a real prefill handle would carry)."""
    from splitserve.shared.grpc_channel import sync_channel
    from splitserve.shared.protocol import worker_pb2 as pb
    from splitserve.shared.protocol import worker_pb2_grpc as pb_grpc

    with sync_channel(stack.worker_address("prefill"), security=stack.security()) as channel:
        stub = pb_grpc.WorkerStub(channel)
        response = stub.Prefill(pb.PrefillRequest(
            request_id="probe", prompt_token_ids=[5, 6, 7],
            sampling_params=pb.SamplingParams(temperature=0, top_p=1, repetition_penalty=1, max_tokens=2)), timeout=30)
        stub.Abort(pb.AbortRequest(request_id="probe"), timeout=5)  # release the held blocks
    return response.kv_handle.layout_hash




def test_request_routed_to_a_dead_worker_is_retried_on_another(tmp_path):
    """Two colocated workers, one killed (and not restarted): requests sent at once, before the
    gateway's next load poll notices, are spread over both workers by the router; those that hit
    the dead one are routed again to the live worker, so every request succeeds."""
    import asyncio

    args = ["--colocated", "--workers", "2", "--no-restart-workers"]
    with LocalStack(args, str(tmp_path / "cache")) as stack:
        client = stack.async_openai(timeout=60)
        os.kill(stack.worker_pid("worker", 1), signal.SIGKILL)

        async def burst():
            return await asyncio.gather(*(client.completions.create(
                model="splitserve-demo", prompt=f"prompt number {i} " * (i + 1), max_tokens=3) for i in range(8)))

        results = asyncio.run(burst())
        assert [r.usage.completion_tokens for r in results] == [3] * 8
        metrics = httpx.get(f"{stack.url}/metrics").text
        assert metric_total(metrics, "splitserve_gateway_worker_failures_total") >= 1  # the retry path really ran
        health = httpx.get(f"{stack.url}/health", timeout=5).json()
        assert [w["healthy"] for w in health["workers"]] == [True, False]
