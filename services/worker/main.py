"""Start one engine worker process: `splitserve prefill|decode|worker`.

Loads the model, opens the KV connector for its role (prefill: holds and sends KV; decode:
receives it), serves the `Worker` gRPC API, and drains on SIGINT/SIGTERM. Prints one
line `splitserve <role> ready on HOST:PORT` once it accepts requests (the launcher waits for it).

Draining (what Kubernetes asks of a pod it terminates, within its grace period):

    serving --SIGTERM--> draining: not ready in grpc.health.v1, Worker.Health and GetLoad;
                         new Prefill/Generate refused (UNAVAILABLE: the gateway routes elsewhere);
                         in-flight calls run on, and KV held for a decode peer waits to be taken
            --idle, or --drain-timeout-s, or a second signal--> stopped: what is left is aborted
                         (its streams end with an error), exit code 0
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import signal
import sys

from splitserve.services.worker.config import SessionConfig
from splitserve.services.worker.health import WorkerHealth
from splitserve.shared import telemetry
from splitserve.shared.async_engine import AsyncEngine, EngineStartupError
from splitserve.shared.config_flags import dataclass_from_args, engine_config_from_args
from splitserve.shared.auth import secret_from_args, warn_if_open
from splitserve.shared.grpc_channel import add_port, aio_server
from splitserve.shared.grpc_security import grpc_security_from_args
from splitserve.shared.heap import freeze_startup_heap
from splitserve.shared.listening import listening_sockets
from splitserve.shared.protocol import worker_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)


def connector_factory(args: argparse.Namespace, role: str, secret: bytes | None = None):
    """What builds the KV connector in the engine process once the engine has allocated its KV
    pool (None when colocated). A partial of a module function: it is pickled to that process."""
    if role == "colocated":
        return None
    return functools.partial(build_connector, args, role, secret)


def build_connector(args: argparse.Namespace, role: str, secret: bytes | None, parts):
    from splitserve.shared.parallel.kv_shards import KvShards
    from splitserve.shared.transfer.connector import TransferConfig, TransferConnector
    from splitserve.shared.transfer.handle import KvLayout

    ranks = parts.followers.world_size
    layout = KvLayout(parts.model_dir, str(parts.dtype).removeprefix("torch."), parts.block_size,
                      parts.info.num_layers, parts.info.num_kv_heads, parts.info.head_dim,
                      tensor_parallel_size=ranks, kv_heads_per_rank=parts.kv_cache.shape[4],
                      kv_groups=tuple((window, tuple(layers)) for window, layers in parts.kv_groups),
                      group_num_blocks=tuple(parts.group_num_blocks))
    shards = KvShards(parts.kv_cache, parts.followers, parts.info.num_kv_heads) if ranks > 1 else None
    # CPU KV moves over TCP; on GPUs UCX picks cuda_ipc / rc itself unless told otherwise.
    tls = args.transfer_ucx_tls or ("tcp" if parts.device.type == "cpu" else None)
    config = dataclass_from_args(TransferConfig, args, prefix="transfer_", role=role, model_id=parts.model_dir,
                                 ucx_tls=tls)
    # A pool split by KV layer group transfers each group's blocks from and into its own tensor.
    pools = parts.kv_caches if parts.kv_groups else parts.kv_cache
    return TransferConnector(pools, config, secret=secret, layout=layout, shards=shards)


def session_config_from_args(args: argparse.Namespace) -> SessionConfig:
    config = dataclass_from_args(SessionConfig, args, prefix="session_")
    config.validate()
    return config


def run_worker(args: argparse.Namespace, role: str) -> int:
    """Serve until SIGINT/SIGTERM (exit code 0) or until the engine dies (exit code 1: a process
    whose engine is gone cannot serve again, so it exits for the launcher or orchestrator to
    restart it, as vLLM's server does when its engine core dies). An engine that cannot start
    (a bad checkpoint) is a start-up failure: exit code 1 with the engine's reason."""
    if args.drain_timeout_s < 0:
        raise SystemExit(f"--drain-timeout-s must be non-negative, got {args.drain_timeout_s}")
    config = engine_config_from_args(args)
    telemetry.setup_tracing(f"splitserve-{role}")
    try:
        engine_died = asyncio.run(_serve(args, role, config))
    except EngineStartupError as exc:
        logger.error("%s worker failed to start: %s", role, exc)
        print(f"splitserve {role} failed to start: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        telemetry.shutdown_tracing()
    return 1 if engine_died else 0


async def _serve(args: argparse.Namespace, role: str, config) -> bool:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    died: list[BaseException] = []

    def on_dead(exc: BaseException) -> None:  # the engine's receiver thread
        died.append(exc)
        loop.call_soon_threadsafe(stop.set)

    secret = secret_from_args(args)
    warn_if_open(secret, f"{role} worker")
    security = grpc_security_from_args(args)
    engine = AsyncEngine(config, role, connector_factory(args, role, secret), model_name=args.served_model_name,
                         on_dead=on_dead)
    try:
        await _serve_engine(args, engine, stop, security, died)
    finally:
        engine.shutdown()
    if died:
        logger.error("%s worker exiting: its engine died (%s: %s)", role, type(died[0]).__name__, died[0])
    return bool(died)


async def _serve_engine(args: argparse.Namespace, engine: AsyncEngine, stop: asyncio.Event, security,
                        died: list[BaseException]) -> None:
    """Serve the Worker API over `engine` until `stop` is set, drain (unless the engine died), then
    stop the server."""
    from splitserve.services.worker.servicer import WorkerServicer

    server = aio_server(interceptors=telemetry.grpc_server_interceptors(), security=security)
    servicer = WorkerServicer(engine, session_config_from_args(args))
    pb_grpc.add_WorkerServicer_to_server(servicer, server)
    health = WorkerHealth(server)
    port = add_port(server, f"{args.host}:{args.port}", security)
    await server.start()
    await health.serving()
    freeze_startup_heap()  # no full collection walks the start-up objects again (a ~50 ms stall of the loop)
    logger.info("%s worker listens on %s (gRPC%s%s; the KV connector listens in the engine process)", engine.role,
                sorted(listening_sockets()), ", mutual TLS" if security.tls else "",
                ", token required" if security.token else ", no auth")
    print(f"splitserve {engine.role} ready on {args.host}:{port} (instance {engine.instance_id}, "
          f"engine process {engine.process.pid}, {engine.torch_threads} torch threads)", flush=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await health.not_ready()
    if not died:
        stop.clear()  # a second signal ends the drain early
        await _drain(servicer, args.drain_timeout_s, stop)
    logger.info("%s worker stopping", engine.role)
    await server.stop(grace=2.0)  # open streams get the engine's error before the process goes


async def _drain(servicer, timeout_s: float, interrupted: asyncio.Event) -> None:
    """Refuse new requests and wait, at most `timeout_s`, for the ones here to finish."""
    servicer.draining = True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    logger.info("draining: no new requests; waiting up to %g s for %d in flight", timeout_s, servicer.num_inflight)
    while not servicer.idle() and loop.time() < deadline and not interrupted.is_set():
        with contextlib.suppress(asyncio.TimeoutError):  # the engine's state has no event to wait on
            await asyncio.wait_for(interrupted.wait(), 0.05)
    if not servicer.idle():
        logger.warning("drain ended with %d calls in flight (%s); they are aborted", servicer.num_inflight,
                       "second signal" if interrupted.is_set() else f"--drain-timeout-s {timeout_s:g} reached")
