"""`splitserve up`: the local stack as processes — N prefill + M decode workers (or colocated
workers) and the gateway in front, the same commands docker-compose runs, one per process.

Start order: make sure the checkpoint exists (the demo one is built once, here, not raced by
three processes), start the workers and wait until each answers Health, then start the gateway
and wait until /health is 200. A worker or gateway that dies is restarted (a restarted worker is
a new instance: new instance id, empty KV pool), after a back-off that doubles with every crash in
a row (RESTART_MIN_S .. RESTART_MAX_S; a process that stayed up STABLE_S starts over at the
minimum), so a client that crashes a service on purpose cannot keep it restarting in a loop.
Ctrl-C or SIGTERM stops everything, gateway first.

Security: unless --secret-file names one, a fresh random secret is written to a 0600 file in a
0700 directory that lives as long as the stack; every process gets the file's path, never the
secret (shared/auth.py). The --grpc-tls-* files are passed on likewise.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from splitserve.services.gateway.config import API_KEY_ENV, AgentApiConfig, RequestLimits, api_key_from_args
from splitserve.shared.config_flags import dataclass_flags_to_argv, engine_flags_to_argv
from splitserve.shared.lifetime import launched_env

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 10.0
RESTART_MIN_S = 0.5
RESTART_MAX_S = 30.0
STABLE_S = 60.0
WORKER_DRAIN_TIMEOUT_S = STOP_TIMEOUT_S / 2
"""The stack stops as a whole (its gateway too, so nothing new arrives): a worker's drain only has
to let what is in flight end, and within the time the launcher waits for it."""


@dataclass
class Child:
    name: str
    argv: list[str]
    address: str = ""
    process: subprocess.Popen | None = None
    restarts: int = 0
    crashes_in_a_row: int = 0
    started_at: float = 0.0
    restart_at: float | None = None
    """Set while the child is down: when the supervisor starts it again."""

    def start(self) -> None:
        self.process = subprocess.Popen(self.argv, env=launched_env())  # it dies with the launcher
        self.started_at, self.restart_at = time.monotonic(), None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def schedule_restart(self, now: float) -> float:
        """Back-off before the next start: doubles with each crash in a row, resets after a stable run."""
        if now - self.started_at >= STABLE_S:
            self.crashes_in_a_row = 0
        delay = min(RESTART_MAX_S, RESTART_MIN_S * 2 ** self.crashes_in_a_row)
        self.crashes_in_a_row += 1
        self.restart_at = now + delay
        return delay


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "splitserve.cli", *args]


def _worker_children(args: argparse.Namespace, model_argv: list[str]) -> tuple[list[Child], list[Child], list[Child]]:
    from splitserve.shared.transfer.config import TransferConfig

    transfer_argv = dataclass_flags_to_argv(TransferConfig, args, prefix="transfer_")
    port = args.worker_base_port
    groups: dict[str, list[Child]] = {"prefill": [], "decode": [], "worker": []}
    counts = {"worker": args.workers} if args.colocated else {"prefill": args.prefill, "decode": args.decode}
    sizes = _role_tensor_parallel_sizes(args)
    devices = _worker_devices(args, sum(counts.values()), [sizes[role] for role, n in counts.items() for _ in range(n)])
    nccl = _nccl_ranks(args, counts)
    for role, count in counts.items():
        for i in range(count):
            address = f"{args.host}:{port}"
            extra = [*transfer_argv, *nccl.get(role, [])] if role != "worker" else []
            extra += ["--tensor-parallel-size", str(sizes[role])]  # after model_argv's: the last one counts
            if role != "worker" and max(sizes["prefill"], sizes["decode"]) > 1:
                extra.append("--no-split-kv-by-layer-group")  # a TP side keeps one KV pool: so must its peer
            device = ["--device", devices[port - args.worker_base_port]] if devices else []
            argv = _cli(role, "--host", args.host, "--port", str(port), "--drain-timeout-s", str(WORKER_DRAIN_TIMEOUT_S),
                        *model_argv, *device, *extra)
            groups[role].append(Child(f"{role}-{i}", argv, address))
            port += 1
    return groups["prefill"], groups["decode"], groups["worker"]


def _role_tensor_parallel_sizes(args: argparse.Namespace) -> dict[str, int]:
    """Each role's ranks per worker: --prefill-tp / --decode-tp, else -tp (colocated workers: -tp)."""
    per_role = {"prefill": getattr(args, "prefill_tensor_parallel_size", None),
                "decode": getattr(args, "decode_tensor_parallel_size", None)}
    if args.colocated and any(size is not None for size in per_role.values()):
        raise SystemExit("splitserve up: --prefill-tp / --decode-tp size the prefill and decode workers; "
                         "colocated workers take -tp")
    sizes = {"worker": args.tensor_parallel_size,
             **{role: size or args.tensor_parallel_size for role, size in per_role.items()}}
    bad = {role: size for role, size in sizes.items() if size < 1}
    if bad:
        raise SystemExit(f"splitserve up: tensor-parallel sizes must be at least 1, got {bad}")
    return sizes


def _worker_devices(args: argparse.Namespace, num_workers: int, ranks: list[int] | None = None) -> list[str]:
    """One device per worker: --worker-devices as given, or round-robin over the GPUs when there
    are several (a prefill and a decode worker on two GPUs land on one each; a worker of N ranks
    takes its first GPU and the N - 1 after it, and the next worker starts after those, back at
    cuda:0 when they would run past the last GPU); [] keeps --device. `ranks`: each worker's
    tensor-parallel size (default -tp for all)."""
    if args.worker_devices:
        devices = [d.strip() for d in args.worker_devices.split(",") if d.strip()]
        if len(devices) != num_workers:
            raise SystemExit(f"--worker-devices names {len(devices)} devices for {num_workers} workers")
        return devices
    if args.device not in ("auto", "cuda"):
        return []
    import torch

    num_gpus = torch.cuda.device_count()
    ranks = ranks or [args.tensor_parallel_size] * num_workers
    if num_gpus <= 1 or max(ranks) >= num_gpus:
        return []
    devices, first = [], 0
    for size in ranks:
        if first + size > num_gpus:
            first = 0
        devices.append(f"cuda:{first}")
        first = (first + size) % num_gpus
    return devices


def _nccl_ranks(args: argparse.Namespace, counts: dict[str, int]) -> dict[str, list[str]]:
    """The NCCL backend pairs one prefill (rank 0) with one decode worker (rank 1) in a process
    group; the launcher picks the rendezvous address. A pair cannot take in a restarted peer, so a
    worker that dies is not restarted: restart the stack."""
    if getattr(args, "transfer_backend", "ucx") != "nccl" or "worker" in counts:
        return {}
    if counts != {"prefill": 1, "decode": 1}:
        raise SystemExit("--transfer-backend nccl pairs exactly one prefill and one decode worker "
                         f"(got {counts['prefill']} and {counts['decode']}); use ucx for more")
    init = args.transfer_nccl_init_method or f"tcp://{args.host}:{_free_port(args.host)}"
    if args.restart_workers:
        logger.warning("--transfer-backend nccl: a worker that dies is not restarted (an NCCL pair cannot "
                       "take in a restarted peer); restart the stack instead")
        args.restart_workers = False
    return {role: ["--transfer-nccl-init-method", init, "--transfer-nccl-rank", str(rank)]
            for rank, role in enumerate(("prefill", "decode"))}


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _wait_worker_ready(child: Child, deadline: float, security) -> None:
    import grpc

    from splitserve.shared.grpc_channel import sync_channel
    from splitserve.shared.protocol import worker_pb2 as pb
    from splitserve.shared.protocol import worker_pb2_grpc as pb_grpc

    with sync_channel(child.address, security=security) as channel:
        stub = pb_grpc.WorkerStub(channel)
        while time.monotonic() < deadline:
            if not child.alive():
                raise RuntimeError(f"{child.name} exited with code {child.process.returncode} during start-up")
            try:
                if stub.Health(pb.HealthRequest(), timeout=1.0).ready:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"{child.name} did not become ready within {START_TIMEOUT_S:.0f} s")


def _make_secret_file(args: argparse.Namespace) -> str | None:
    """A fresh secret for this stack unless --secret-file names one; returns the dir to remove."""
    if args.secret_file:
        return None
    import tempfile

    from splitserve.shared.auth import write_secret_file

    directory = tempfile.mkdtemp(prefix="splitserve-secret-")  # mode 0700
    args.secret_file = os.path.join(directory, "secret")
    write_secret_file(args.secret_file)
    return directory


def _wait_gateway_ready(child: Child, url: str, deadline: float, processes: int = 1) -> None:
    """Until /health is 200 from `processes` distinct gateway processes. Each check is a new
    connection, which the kernel hands to any process on the port."""
    import httpx

    ready: set[int] = set()
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"gateway exited with code {child.process.returncode} during start-up")
        try:
            response = httpx.get(f"{url}/health", timeout=1.0)
            if response.status_code == 200:
                ready.add(response.json().get("pid"))
                if len(ready) >= processes:
                    return
                continue  # another connection, maybe another process
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"gateway did not become healthy within {START_TIMEOUT_S:.0f} s "
                       f"({len(ready)} of {processes} processes answered)")


def _stop(children: list[Child]) -> None:
    stop_processes([(child.name, child.process) for child in children if child.process is not None])


def stop_processes(processes: list[tuple[str, subprocess.Popen]]) -> None:
    """SIGTERM every (name, process) still running, wait for all of them together (bounded), and
    kill the ones that outlast it. Also used by the gateway's own process supervisor."""
    for _, process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for name, process in processes:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop in %.0f s; killing it", name, STOP_TIMEOUT_S)
            process.kill()
            process.wait(5)


def run_stack(args: argparse.Namespace) -> int:
    from splitserve.shared.demo import resolve_model_dir, served_model_name

    from splitserve.shared.grpc_security import grpc_security_argv, grpc_security_from_args

    _role_tensor_parallel_sizes(args)  # refuse bad sizes before anything starts
    names = args.served_model_name or [served_model_name(args.model)]
    name = names[0]
    model_dir = resolve_model_dir(args.model)  # builds the demo checkpoint once, before the children
    args.model = model_dir
    secret_dir = _make_secret_file(args)
    security = grpc_security_from_args(args)
    from splitserve.services.worker.config import SessionConfig

    model_argv = [*engine_flags_to_argv(args), *dataclass_flags_to_argv(SessionConfig, args, prefix="session_"),
                  "--served-model-name", name, *grpc_security_argv(args)]
    prefill, decode, colocated = _worker_children(args, model_argv)
    workers = prefill + decode + colocated
    url = f"http://{args.host}:{args.port}"
    topology = (["--worker-urls", ",".join(c.address for c in colocated)] if colocated else
                ["--prefill-urls", ",".join(c.address for c in prefill),
                 "--decode-urls", ",".join(c.address for c in decode)])
    gateway_options = ["--processes", str(args.gateway_processes), *dataclass_flags_to_argv(RequestLimits, args),
                       *dataclass_flags_to_argv(AgentApiConfig, args)]
    if api_key_from_args(args):  # the children inherit it; a command line would show it to `ps`
        os.environ[API_KEY_ENV] = api_key_from_args(args)
    if args.session_window is not None:
        gateway_options += ["--session-window", str(args.session_window)]
    if args.decode_prefill_max_new_tokens is not None:
        gateway_options += ["--decode-prefill-max-new-tokens", str(args.decode_prefill_max_new_tokens)]
    gateway = Child("gateway", _cli("gateway", "--host", args.host, "--port", str(args.port), "--model", model_dir,
                                    "--served-model-name", *names, *gateway_options, *topology,
                                    *grpc_security_argv(args)))
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        for child in workers:
            child.start()
        for child in workers:
            _wait_worker_ready(child, deadline, security)
        gateway.start()
        _wait_gateway_ready(gateway, url, deadline, args.gateway_processes)
        print(f"splitserve is up: {url}/v1  (OpenAI API; model dir {model_dir}; "
              f"{'%d colocated' % len(colocated) if colocated else '%d prefill + %d decode' % (len(prefill), len(decode))}"
              f" workers). Ctrl-C stops it.", flush=True)
        while not stopping:
            _supervise([*(workers if args.restart_workers else []), gateway])
            time.sleep(0.2)
        return 0
    except (RuntimeError, TimeoutError) as exc:
        print(f"splitserve up failed: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        # The gateway first: a worker's graceful stop waits for the Session streams the gateway
        # holds open, so stopping both at once cost every stack seconds (more under load).
        _stop([gateway])
        _stop(workers)
        if secret_dir is not None:
            shutil.rmtree(secret_dir, ignore_errors=True)


def _supervise(children: list[Child]) -> None:
    """Restart, after its back-off, each child that exited (a worker left out stays down: the
    NCCL pairs and --no-restart-workers)."""
    now = time.monotonic()
    for child in children:
        if child.alive():
            continue
        if child.restart_at is None:
            delay = child.schedule_restart(now)
            logger.warning("%s exited with code %s; restarting it in %.1f s (crash %d in a row)", child.name,
                           child.process.returncode, delay, child.crashes_in_a_row)
        elif now >= child.restart_at:
            child.restarts += 1
            child.start()
