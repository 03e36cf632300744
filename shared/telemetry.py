"""OpenTelemetry tracing for every service: one trace per request, gateway -> prefill -> transfer -> decode.

Off unless configured through the standard variables (`OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`; `OTEL_SERVICE_NAME` names the process). When on, spans
are exported over OTLP/gRPC in batches, and the gRPC interceptors returned here carry W3C
`traceparent` in gRPC metadata so a worker's spans join the gateway's trace. A request sent inside
a long-lived stream (a worker Session) carries its own context in the message instead
(`context_carrier` on the sending side, `span(..., carrier=...)` on the receiving one).

Torch-free: the gateway uses it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from contextlib import contextmanager

from opentelemetry import propagate, trace

logger = logging.getLogger(__name__)
_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
_provider = None


def tracing_enabled() -> bool:
    return _provider is not None


def setup_tracing(default_service_name: str) -> bool:
    """Install an OTLP-exporting tracer provider if an endpoint is configured. Idempotent."""
    global _provider
    if _provider is not None:
        return True
    if not any(os.environ.get(v) for v in _ENDPOINT_VARS) or os.environ.get("OTEL_SDK_DISABLED") == "true":
        return False
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    name = os.environ.get("OTEL_SERVICE_NAME") or default_service_name
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(), schedule_delay_millis=200))
    trace.set_tracer_provider(provider)
    _provider = provider
    logger.info("tracing on: service %s exports OTLP to %s", name,
                os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    return True


def shutdown_tracing() -> None:
    if _provider is not None:
        _provider.shutdown()


def tracer(name: str = "splitserve"):
    return trace.get_tracer(name)


def grpc_server_interceptors() -> list:
    if not tracing_enabled():
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor()]


def grpc_client_interceptors() -> list:
    if not tracing_enabled():
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors())


def instrument_fastapi(app) -> None:
    if tracing_enabled():
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        FastAPIInstrumentor.instrument_app(app, excluded_urls="health,metrics")


def context_carrier() -> dict[str, str]:
    """The current trace context as W3C headers (`traceparent`, ...); empty when tracing is off."""
    carrier: dict[str, str] = {}
    if tracing_enabled():
        propagate.inject(carrier)
    return carrier


@contextmanager
def span(name: str, carrier: Mapping[str, str] | None = None, **attributes):
    """A span in the current trace, or under the context in `carrier` when one is given (a no-op
    span when tracing is off)."""
    parent = propagate.extract(carrier) if carrier else None
    with tracer().start_as_current_span(name, context=parent) as s:
        for key, value in attributes.items():
            s.set_attribute(key, value)
        yield s
