"""Command-line entry of the gateway: `add_gateway_args(parser)` + `run_gateway(args)`.

    splitserve gateway --worker-urls localhost:50053
    splitserve gateway --prefill-urls localhost:50051 --decode-urls localhost:50052 --port 8000
    splitserve gateway --worker-urls localhost:50053 --processes 4

Flags other than --host/--port/--model/--processes are generated from `GatewayConfig`'s fields (one
config system); `splitserve.services.flags` uses this parser for the `splitserve` command.

One gateway process streams a few thousand SSE events a second before its event loop is the
limit (docs/benchmarks.md, section 6). `--processes N` runs N gateway processes on one port, as
vLLM's `--api-server-count` does: each binds it with SO_REUSEPORT and the kernel spreads incoming
connections over them. Each process routes on its own, from the same worker load reports, and
opens its own session to each worker. The admission limits apply to each process. /metrics adds
up every process's counters and histograms, through prometheus_client's multiprocess mode. The
Responses API's stored responses are one SQLite database for all of them (response_store.py), in
a directory made for the run unless --response-store-dir names one.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from splitserve.services.gateway.config import (
    API_KEY_ENV, AgentApiConfig, GatewayConfig, RequestLimits, add_api_key_arg, api_key_from_args)
from splitserve.services.launcher import stop_processes
from splitserve.shared.auth import secret_from_args, warn_if_open
from splitserve.shared.config_flags import add_dataclass_flags, dataclass_flags_to_argv, dataclass_from_args
from splitserve.shared.grpc_security import add_grpc_security_args, grpc_security_argv, grpc_security_from_args
from splitserve.shared.lifetime import launched_env

logger = logging.getLogger(__name__)

_NOT_FLAGS = ("model_dir", "limits", "agent_api", "served_model_name", "served_model_aliases")
"""GatewayConfig fields not generated as flags: set from --model and --served-model-name (vLLM's
flags, the latter taking several names) or from RequestLimits' own flags."""


def add_gateway_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default=None, help="checkpoint dir for the tokenizer (default: the demo checkpoint)")
    parser.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                        help="names clients use for the model; the first is the one responses name "
                             "(default: --model as given, or splitserve-demo)")
    parser.add_argument("--processes", type=int, default=1,
                        help="gateway processes sharing the port (SO_REUSEPORT); admission limits apply to each")
    parser.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # set for the N processes
    add_api_key_arg(parser)
    add_dataclass_flags(parser, GatewayConfig, "gateway options", skip=_NOT_FLAGS)
    add_dataclass_flags(parser, RequestLimits, "request limits")
    add_dataclass_flags(parser, AgentApiConfig, "tools, reasoning and the Responses API")
    add_grpc_security_args(parser)


def gateway_config_from_args(args: argparse.Namespace) -> GatewayConfig:
    """Served names: --served-model-name, else 'splitserve-demo' for the demo checkpoint, else
    --model as given (vLLM's rule)."""
    from splitserve.shared.demo import ensure_demo_checkpoint, served_model_name

    names = getattr(args, "served_model_name", None) or [served_model_name(args.model)]
    model_dir = args.model if args.model is not None else ensure_demo_checkpoint()  # built on first use
    config = dataclass_from_args(GatewayConfig, args, model_dir=model_dir, served_model_name=names[0],
                                 served_model_aliases=tuple(names[1:]), limits=dataclass_from_args(RequestLimits, args),
                                 agent_api=dataclass_from_args(AgentApiConfig, args))
    config.validate()
    return config


def run_gateway(args: argparse.Namespace, client_interceptors=()) -> int:
    """Serve the gateway until interrupted (uvicorn handles SIGINT/SIGTERM).

    With OTEL_EXPORTER_OTLP_ENDPOINT set, HTTP requests get server spans and every gRPC call
    carries the trace context to the workers (see shared/telemetry.py)."""
    import uvicorn

    from splitserve.services.gateway.app import build_app
    from splitserve.shared import telemetry
    from splitserve.shared.heap import freeze_startup_heap

    if args.processes < 1:
        raise SystemExit(f"--processes must be at least 1, got {args.processes}")
    if args.processes > 1 and args.port == 0:
        raise SystemExit("--processes N shares one port between the processes: give a fixed --port, not 0")
    config = gateway_config_from_args(args)  # validated (and the demo checkpoint built) once, here
    if args.processes > 1:
        return _run_processes(args, config)
    telemetry.setup_tracing("splitserve-gateway")
    interceptors = [*client_interceptors, *telemetry.grpc_client_interceptors()]
    security = grpc_security_from_args(args)
    warn_if_open(secret_from_args(args), "gateway")
    app = build_app(config, client_interceptors=interceptors, api_key=api_key_from_args(args), security=security)
    telemetry.instrument_fastapi(app)
    freeze_startup_heap()  # the app, its tokenizer and libraries: no full collection walks them again
    try:
        if args.reuse_port:
            server = uvicorn.Server(uvicorn.Config(app, loop=event_loop(), log_level="info", timeout_graceful_shutdown=5))
            server.run(sockets=[_reuse_port_socket(args.host, args.port)])
        else:
            uvicorn.run(app, host=args.host, port=args.port, loop=event_loop(), log_level="info",
                        timeout_graceful_shutdown=5)
    finally:
        telemetry.shutdown_tracing()
    return 0


def event_loop() -> str:
    """uvicorn's event loop: uvloop (a dependency, through uvicorn[standard]), or asyncio's own
    with a warning where uvloop is missing, which uvicorn's "auto" would pick silently."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        logger.warning("uvloop is not installed: the gateway runs on asyncio's default event loop, which spends "
                       "more CPU a streamed token (pip install uvloop)")
        return "asyncio"
    return "uvloop"


def _reuse_port_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def _run_processes(args: argparse.Namespace, config: GatewayConfig) -> int:
    """Run `args.processes` single gateways on the port and supervise them: a signal here stops them
    all; one that exits stops the others, and its exit code is ours."""
    metrics_dir = store_dir = None
    env = launched_env()  # they die with this supervisor
    api_key = api_key_from_args(args)
    if api_key:
        env[API_KEY_ENV] = api_key  # in the environment, not on command lines that `ps` shows
    if not env.get("PROMETHEUS_MULTIPROC_DIR"):
        metrics_dir = tempfile.mkdtemp(prefix="splitserve-gateway-metrics-")
        env["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    store_flags = []
    if config.agent_api.response_store_dir is None:  # one store for the processes, for this run
        store_dir = tempfile.mkdtemp(prefix="splitserve-gateway-responses-")
        store_flags = ["--response-store-dir", store_dir]
    argv = [sys.executable, "-m", "splitserve.cli", "gateway", "--host", args.host, "--port", str(args.port),
            "--model", config.model_dir, "--served-model-name", config.served_model_name, *config.served_model_aliases,
            "--processes", "1", "--reuse-port",
            *dataclass_flags_to_argv(GatewayConfig, args, skip=_NOT_FLAGS), *dataclass_flags_to_argv(RequestLimits, args),
            *dataclass_flags_to_argv(AgentApiConfig, args), *store_flags, *grpc_security_argv(args)]
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    children = [subprocess.Popen(argv, env=env) for _ in range(args.processes)]
    try:
        while not stopping and all(c.poll() is None for c in children):
            time.sleep(0.2)
        exited = [c.returncode for c in children if c.poll() is not None]
        code = 0 if stopping else next((rc for rc in exited if rc), 1)
        if not stopping:
            logger.error("a gateway process exited with code %s; stopping the others", exited[0])
        return code
    finally:
        stop_processes([(f"gateway process {child.pid}", child) for child in children])
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for made in (metrics_dir, store_dir):
            if made is not None:
                shutil.rmtree(made, ignore_errors=True)
