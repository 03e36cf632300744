"""Command-line entry of the gateway: `add_gateway_args(parser)` + `run_gateway(args)`.

    splitserve gateway --worker-urls localhost:50051
    splitserve gateway --prefill-urls localhost:50051 --decode-urls localhost:50052 --port 8000
"""

from __future__ import annotations

import argparse
import os

from splitserve.services.gateway.config import GatewayConfig

DEMO_SERVED_NAME = "splitserve-demo"


def add_gateway_args(parser: argparse.ArgumentParser) -> None:
    d = GatewayConfig(model_dir="", served_model_name="")
    parser.add_argument("--model", default=None, help="checkpoint directory (tokenizer); default: the demo checkpoint")
    parser.add_argument("--served-model-name", default=None,
                        help="model name clients use; default 'splitserve-demo' for the demo, else the directory name")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--prefill-urls", nargs="*", default=[], help="prefill workers host:port (with --decode-urls)")
    parser.add_argument("--decode-urls", nargs="*", default=[], help="decode workers host:port")
    parser.add_argument("--worker-urls", nargs="*", default=[], help="colocated workers host:port")
    parser.add_argument("--max-model-len", type=int, default=None, help="override the context length the workers report")
    parser.add_argument("--max-inflight-requests", type=int, default=d.max_inflight_requests)
    parser.add_argument("--max-queued-requests", type=int, default=d.max_queued_requests)
    parser.add_argument("--queue-timeout-s", type=float, default=d.queue_timeout_s)
    parser.add_argument("--max-n", type=int, default=d.max_n)
    parser.add_argument("--load-poll-interval-s", type=float, default=d.load_poll_interval_s)
    parser.add_argument("--prefill-timeout-s", type=float, default=d.prefill_timeout_s)
    parser.add_argument("--generate-timeout-s", type=float, default=d.generate_timeout_s)


def _split_urls(values: list[str]) -> tuple[str, ...]:
    """Accept both `--x a b` and `--x a,b`."""
    return tuple(u for v in values for u in v.split(",") if u)


def gateway_config_from_args(args: argparse.Namespace) -> GatewayConfig:
    model_dir, served = args.model, args.served_model_name
    if model_dir is None:
        from splitserve.shared.demo import ensure_demo_checkpoint  # builds it on first use (needs torch once)

        model_dir, default_name = ensure_demo_checkpoint(), DEMO_SERVED_NAME
    else:
        default_name = os.path.basename(os.path.normpath(model_dir))
    config = GatewayConfig(
        model_dir=model_dir, served_model_name=served or default_name,
        prefill_urls=_split_urls(args.prefill_urls), decode_urls=_split_urls(args.decode_urls),
        worker_urls=_split_urls(args.worker_urls), max_model_len=args.max_model_len,
        max_inflight_requests=args.max_inflight_requests, max_queued_requests=args.max_queued_requests,
        queue_timeout_s=args.queue_timeout_s, max_n=args.max_n, load_poll_interval_s=args.load_poll_interval_s,
        prefill_timeout_s=args.prefill_timeout_s, generate_timeout_s=args.generate_timeout_s)
    config.validate()
    return config


def run_gateway(args: argparse.Namespace, client_interceptors=()) -> int:
    """Serve the gateway until interrupted; `args` from a parser given `add_gateway_args`."""
    import uvicorn

    from splitserve.services.gateway.app import build_app

    app = build_app(gateway_config_from_args(args), client_interceptors=client_interceptors)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
    return 0
