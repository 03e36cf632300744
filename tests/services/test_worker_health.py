"""A real worker process answers the standard gRPC health protocol (grpc.health.v1), which
Kubernetes' native gRPC probes use (deploy/helm/splitserve), and exits 0 on SIGTERM."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from worker_process import WorkerProcess

pytestmark = pytest.mark.slow

SERVING = health_pb2.HealthCheckResponse.SERVING


def check(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_worker_serves_grpc_health_for_probes(demo_checkpoint_dir, tmp_path):
    with WorkerProcess("worker", demo_checkpoint_dir, tmp_path) as worker:
        for service in ("", "splitserve.v1.Worker", "liveness"):
            assert check(worker.address, service) == SERVING, service
        with pytest.raises(grpc.RpcError) as err:
            check(worker.address, "no.such.Service")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        worker.terminate()
        assert worker.wait(60) == 0, worker.output()
