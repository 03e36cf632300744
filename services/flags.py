"""Command-line parsers of the services (`splitserve gateway|prefill|decode|worker|up`).

Flags come from the config dataclasses (engine, transfer, gateway) so each default lives in one
place. Each subparser sets `run`, the function `splitserve.cli.main` calls with the parsed args.
"""

from __future__ import annotations

import argparse

from splitserve.shared.config_flags import add_dataclass_flags, add_engine_flags
from splitserve.shared.grpc_security import add_grpc_security_args


def _run_prefill(args):
    from splitserve.services import prefill

    return prefill.run(args)


def _run_decode(args):
    from splitserve.services import decode

    return decode.run(args)


def _run_worker(args):
    from splitserve.services import worker

    return worker.run(args)


def _run_gateway(args):
    from splitserve.services.gateway.main import run_gateway

    return run_gateway(args)


def _run_up(args):
    from splitserve.services.launcher import run_stack

    return run_stack(args)


def _add_transfer_flags(parser: argparse.ArgumentParser) -> None:
    from splitserve.shared.transfer.config import TransferConfig

    add_dataclass_flags(parser, TransferConfig, "KV transfer options", prefix="transfer_", skip=("role", "layout_hash", "model_id"))


def _add_session_flags(parser: argparse.ArgumentParser) -> None:
    from splitserve.services.worker.config import SessionConfig

    add_dataclass_flags(parser, SessionConfig, "worker session options", prefix="session_")


def _add_worker_parser(sub, name: str, help_text: str, run, default_port: int, transfer: bool) -> None:
    p = sub.add_parser(name, help=help_text)
    p.add_argument("--host", default="127.0.0.1", help="address the gRPC server binds")
    p.add_argument("--port", type=int, default=default_port, help="gRPC port (0 picks a free one)")
    p.add_argument("--served-model-name", default=None, help="model name reported to the gateway")
    p.add_argument("--drain-timeout-s", type=float, default=30.0,
                   help="on SIGTERM, stop taking requests and give those in flight this long to finish "
                        "(keep it below Kubernetes' terminationGracePeriodSeconds)")
    add_engine_flags(p)
    add_grpc_security_args(p)
    _add_session_flags(p)
    if transfer:
        _add_transfer_flags(p)
    p.set_defaults(run=run)


def _add_gateway_parser(sub) -> None:
    from splitserve.services.gateway.main import add_gateway_args

    p = sub.add_parser("gateway", help="the OpenAI-compatible HTTP gateway")
    add_gateway_args(p)
    p.set_defaults(run=_run_gateway)


def _add_up_parser(sub) -> None:
    p = sub.add_parser("up", help="start the local stack (gateway + prefill + decode) as processes")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="the gateway's HTTP port")
    p.add_argument("--prefill", type=int, default=1, help="number of prefill workers")
    p.add_argument("--decode", type=int, default=1, help="number of decode workers")
    p.add_argument("--colocated", action="store_true", help="one worker doing both phases instead")
    p.add_argument("--workers", type=int, default=1, help="number of colocated workers (with --colocated)")
    p.add_argument("--worker-base-port", type=int, default=50100, help="first gRPC port of the workers")
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="names clients use for the model, as in vLLM; the first is the one responses name "
                        "(default: --model as given, or splitserve-demo)")
    p.add_argument("--gateway-processes", type=int, default=1,
                   help="gateway processes sharing the HTTP port, for more streams than one event loop serves "
                        "(like vLLM's --api-server-count)")
    p.add_argument("--session-window", type=int, default=None,
                   help="the gateway's session credit per worker (see splitserve gateway --help)")
    p.add_argument("--decode-prefill-max-new-tokens", type=int, default=None,
                   help="a keyed session's turn with at most this many new tokens runs whole on the decode worker "
                        "holding its history (see splitserve gateway --help; 0: never)")
    p.add_argument("--restart-workers", action=argparse.BooleanOptionalAction, default=True,
                   help="restart a worker process that dies")
    p.add_argument("--prefill-tensor-parallel-size", "--prefill-tp", type=int, default=None, metavar="N",
                   help="ranks of each prefill worker (default: -tp); may differ from the decode workers', the KV "
                        "moves with whole heads between them")
    p.add_argument("--decode-tensor-parallel-size", "--decode-tp", type=int, default=None, metavar="N",
                   help="ranks of each decode worker (default: -tp)")
    p.add_argument("--worker-devices", default=None,
                   help="comma list of devices, one per worker in start order (prefill workers, then decode, "
                        "or the colocated ones), e.g. cuda:0,cuda:1; default: with several GPUs, round-robin")
    _add_gateway_limit_flags(p)
    from splitserve.services.gateway.config import AgentApiConfig

    add_dataclass_flags(p, AgentApiConfig, "gateway: tools, reasoning and the Responses API")
    add_engine_flags(p)
    add_grpc_security_args(p)
    _add_session_flags(p)
    _add_transfer_flags(p)
    p.set_defaults(run=_run_up)


def _add_gateway_limit_flags(parser: argparse.ArgumentParser) -> None:
    """`up` passes these on to its gateway (the API key through the environment)."""
    from splitserve.services.gateway.config import RequestLimits, add_api_key_arg

    add_api_key_arg(parser)
    add_dataclass_flags(parser, RequestLimits, "gateway request limits")


def add_service_parsers(sub) -> None:
    _add_up_parser(sub)
    _add_gateway_parser(sub)
    _add_worker_parser(sub, "prefill", "a prefill worker (gRPC)", _run_prefill, 50051, transfer=True)
    _add_worker_parser(sub, "decode", "a decode worker (gRPC)", _run_decode, 50052, transfer=True)
    _add_worker_parser(sub, "worker", "a colocated worker doing prefill and decode (gRPC)", _run_worker, 50053,
                       transfer=False)
