"""The standard gRPC health service (`grpc.health.v1.Health`) of every worker.

Kubernetes' native gRPC probes (and `grpc_health_probe`, Envoy, ...) speak this protocol, not our
own `Worker.Health`. Two kinds of answer, told apart by the probe's `service` field:

    ""  and  "splitserve.v1.Worker"  readiness: SERVING while this worker takes new requests;
                                    NOT_SERVING while it drains (SIGTERM) or once its engine died
    "liveness"                      SERVING as long as the process serves at all, drain included,
                                    so a draining worker is not killed before its grace period ends
"""

from __future__ import annotations

from grpc_health.v1 import health, health_pb2, health_pb2_grpc

READINESS_SERVICES = ("", "splitserve.v1.Worker")
LIVENESS_SERVICE = "liveness"


class WorkerHealth:
    """Owns the health servicer's statuses; the worker flips them as its state changes."""

    def __init__(self, server) -> None:
        self.servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    async def serving(self) -> None:
        for service in (*READINESS_SERVICES, LIVENESS_SERVICE):
            await self.servicer.set(service, health_pb2.HealthCheckResponse.SERVING)

    async def not_ready(self) -> None:
        """Draining or dead: probes route elsewhere; liveness stays as it is."""
        for service in READINESS_SERVICES:
            await self.servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
