"""A worker that gets SIGTERM drains (services/worker/main.py), as Kubernetes expects of a pod
it terminates: its in-flight streams finish, new requests go to the other worker, and it exits 0.

Real parts throughout: two worker processes on the demo checkpoint, the gateway (uvicorn, in
this process) in front of them, the `openai` client, and the standard gRPC health protocol
Kubernetes' probes use (grpc.health.v1).
"""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from openai import OpenAI
from scripted_worker import BackgroundLoop, GatewayServer
from stack import all_up
from worker_process import WorkerProcess, wait_until

from splitserve.services.gateway.app import build_app
from splitserve.services.gateway.config import GatewayConfig
from splitserve.shared.protocol import convert, worker_pb2 as pb, worker_pb2_grpc

pytestmark = pytest.mark.slow

MODEL = "splitserve-demo"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
LONG = 300  # tokens of the in-flight stream: seconds of decoding, far longer than starting the drain
# (the drain is seen and 3 requests served within ~2 s of the stream's first token on a loaded 2-core
# box, where 600 tokens took ~55 s; the stream is decoded twice, so its length is this test's time)


def health(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def load(address: str) -> convert.WorkerLoad:
    with grpc.insecure_channel(address) as channel:
        return convert.load_from_proto(worker_pb2_grpc.WorkerStub(channel).GetLoad(pb.LoadRequest(), timeout=10))


def test_a_terminating_worker_finishes_its_streams_and_new_requests_go_elsewhere(demo_checkpoint_dir, tmp_path):
    loop = BackgroundLoop()
    workers = [WorkerProcess("worker", demo_checkpoint_dir, tmp_path, "--drain-timeout-s", "120") for _ in range(2)]
    with all_up(*workers) as (first, second):
        for service in ("", "splitserve.v1.Worker", "liveness"):
            assert health(first.address, service) == SERVING, service
        cfg = GatewayConfig(model_dir=demo_checkpoint_dir, served_model_name=MODEL,
                            worker_urls=(first.address, second.address), load_poll_interval_s=0.1)
        gateway = GatewayServer(loop, build_app(cfg))
        client = OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", timeout=300, max_retries=0)
        try:
            _check_drain(client, first, second)
        finally:
            gateway.stop()
            loop.close()


def _check_drain(client: OpenAI, first: WorkerProcess, second: WorkerProcess) -> None:
    workers = {first.address: first, second.address: second}
    args = dict(model=MODEL, prompt="def drain(pod):", max_tokens=LONG, temperature=0,
                extra_body={"ignore_eos": True})
    stream = client.completions.create(stream=True, **args)
    text = next(iter(stream)).choices[0].text
    busy = next(a for a in workers if load(a).num_running == 1)
    draining, other = workers[busy], next(w for a, w in workers.items() if a != busy)
    draining.terminate()

    wait_until(lambda: load(draining.address).draining, 60, "GetLoad to report draining")
    assert health(draining.address, "splitserve.v1.Worker") == NOT_SERVING
    assert health(draining.address, "") == NOT_SERVING
    assert health(draining.address, "liveness") == SERVING  # draining is not dying: no restart
    assert load(draining.address).num_running == 1, "the stream ended before the drain could be seen"

    # New requests while it drains: all served, by the other worker.
    for i in range(3):
        reply = client.completions.create(model=MODEL, prompt=f"x = {i}", max_tokens=4, temperature=0)
        assert reply.choices[0].finish_reason == "length"
    assert load(draining.address).num_running == 1 and draining.proc.poll() is None

    # The in-flight stream runs to its end, token for token what the other worker gives.
    try:
        for chunk in stream:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason
    except Exception as exc:
        raise AssertionError(f"the in-flight stream failed: {exc}\n{draining.output()}") from exc
    assert finish == "length"
    assert draining.wait(120) == 0, draining.output()
    assert "draining" in draining.output()
    again = client.completions.create(**args)
    assert again.choices[0].text == text
