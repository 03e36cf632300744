"""A real OTLP/gRPC trace receiver on a free local port, for the stacks' exporters to send to.

    with otlp_receiver() as receiver:
        env = otlp_env(receiver.port)   # for the stack's processes
        receiver.spans      # (service name, span name, trace id hex, {attribute: AnyValue}) of every span
        receiver.timed      # the same spans as TimedSpans: with start, end and events (unix ns)
"""

from __future__ import annotations

import contextlib
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from stack import free_port


@dataclass
class TimedSpan:
    service: str
    name: str
    trace_id: str
    start_ns: int
    end_ns: int
    attributes: dict
    events: dict[str, int]
    """Event name -> time (unix ns) of its first occurrence."""


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Records (service name, span name, trace id, attributes) of every span exported to it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.spans: list[tuple[str, str, str, dict]] = []
        self.timed: list[TimedSpan] = []
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
                        events: dict[str, int] = {}
                        for event in span.events:
                            events.setdefault(event.name, event.time_unix_nano)
                        self.timed.append(TimedSpan(service, span.name, span.trace_id.hex(), span.start_time_unix_nano,
                                                    span.end_time_unix_nano, attrs, events))
        return trace_service_pb2.ExportTraceServiceResponse()


@contextlib.contextmanager
def otlp_receiver():
    receiver = Receiver(free_port())
    server = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    server.add_insecure_port(f"127.0.0.1:{receiver.port}")
    server.start()
    try:
        yield receiver
    finally:
        server.stop(1)


def otlp_env(port: int) -> dict[str, str]:
    """The environment that points a stack's exporters at the receiver on `port`."""
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_EXPORTER_OTLP_INSECURE": "true"}
