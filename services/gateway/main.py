"""Command-line entry of the gateway: `add_gateway_args(parser)` + `run_gateway(args)`.

    splitserve gateway --worker-urls localhost:50053
    splitserve gateway --prefill-urls localhost:50051 --decode-urls localhost:50052 --port 8000

Flags other than --host/--port/--model are generated from `GatewayConfig`'s fields (one config
system); `splitserve.services.flags` builds the same parser for the `splitserve` command.
"""

from __future__ import annotations

import argparse

from splitserve.services.gateway.config import GatewayConfig
from splitserve.shared.config_flags import add_dataclass_flags, dataclass_from_args



def add_gateway_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default=None, help="checkpoint dir for the tokenizer (default: the demo checkpoint)")
    add_dataclass_flags(parser, GatewayConfig, "gateway options", skip=("model_dir",))


def gateway_config_from_args(args: argparse.Namespace) -> GatewayConfig:
    """Served name: --served-model-name, else 'splitserve-demo' for the demo checkpoint, else the dir's name."""
    from splitserve.shared.demo import ensure_demo_checkpoint, served_model_name

    served = getattr(args, "served_model_name", None) or served_model_name(args.model)
    model_dir = args.model if args.model is not None else ensure_demo_checkpoint()  # built on first use
    config = dataclass_from_args(GatewayConfig, args, model_dir=model_dir, served_model_name=served)
    config.validate()
    return config


def run_gateway(args: argparse.Namespace, client_interceptors=()) -> int:
    """Serve the gateway until interrupted (uvicorn handles SIGINT/SIGTERM).

    With OTEL_EXPORTER_OTLP_ENDPOINT set, HTTP requests get server spans and every gRPC call
    carries the trace context to the workers (see shared/telemetry.py)."""
    import uvicorn

    from splitserve.services.gateway.app import build_app
    from splitserve.shared import telemetry

    telemetry.setup_tracing("splitserve-gateway")
    interceptors = [*client_interceptors, *telemetry.grpc_client_interceptors()]
    app = build_app(gateway_config_from_args(args), client_interceptors=interceptors)
    telemetry.instrument_fastapi(app)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
    finally:
        telemetry.shutdown_tracing()
    return 0
