"""OpenTelemetry across processes: with the stack's OTLP endpoint pointed at a real OTLP/gRPC
receiver started here, one request yields one trace with spans from the gateway, the prefill
service, the KV transfer and the decode service."""

from __future__ import annotations

import threading
from collections import defaultdict
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from stack import LocalStack, free_port, wait_until

pytestmark = pytest.mark.slow


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """A real OTLP trace receiver: records (service name, span name, trace id) of every span."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, str, dict]] = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for resource_spans in request.resource_spans:
                service = next((a.value.string_value for a in resource_spans.resource.attributes
                                if a.key == "service.name"), "?")
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        attrs = {a.key: a.value for a in span.attributes}
                        self.spans.append((service, span.name, span.trace_id.hex(), attrs))
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture(scope="module")
def receiver():
    port = free_port()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    servicer = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    yield port, servicer
    server.stop(1)


def test_one_trace_spans_gateway_prefill_transfer_decode(receiver, tmp_path):
    port, servicer = receiver
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_EXPORTER_OTLP_INSECURE": "true"}
    with LocalStack(["--prefill", "1", "--decode", "1"], str(tmp_path / "cache"), env=env) as stack:
        r = stack.openai().completions.create(model="splitserve-demo", prompt="trace me " * 8, max_tokens=5,
                                              temperature=0)
        assert r.usage.completion_tokens == 5

        def services_in_one_trace():
            by_trace = defaultdict(set)
            with servicer.lock:
                for service, name, trace_id, _ in servicer.spans:
                    by_trace[trace_id].add((service, name))
            for trace_id, spans in by_trace.items():
                services = {s for s, _ in spans}
                names = {n for _, n in spans}
                if {"splitserve-gateway", "splitserve-prefill", "splitserve-decode"} <= services and \
                        {"prefill", "decode", "kv_transfer"} <= names:
                    return trace_id
            return None

        trace_id = wait_until(services_in_one_trace, timeout_s=20, interval_s=0.5, message="one full trace")
    spans = [s for s in servicer.spans if s[2] == trace_id]
    transfer = [attrs for service, name, _, attrs in spans if name == "kv_transfer"]
    assert transfer and transfer[0]["splitserve.kv_bytes"].int_value > 0
    assert transfer[0]["splitserve.ok"].bool_value
