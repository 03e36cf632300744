"""Start the real local stack (`splitserve up`) as subprocesses for end-to-end tests.

    with LocalStack(["--prefill", "1", "--decode", "1"], tmp_path) as stack:
        client = stack.openai()
        stack.load("decode", 0)      # the worker's GetLoad report

Every process is real (gateway, prefill, decode, gRPC, ZMQ, UCX over loopback TCP); the stack
serves the demo checkpoint from a per-test cache, which links the test session's one build
(tests/demo_cache.py). Stopping sends SIGINT, as Ctrl-C would.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for demo_cache (loadtests/ import this file)

from demo_cache import seed_demo  # noqa: E402
from splitserve.shared.auth import write_secret_file  # noqa: E402

READY_TIMEOUT_S = 240.0


_handed_out: set[int] = set()
"""Ports given out by this process: stacks started together (all_up) bind theirs only later, so a
port that is free now may already be another stack's."""


def free_port() -> int:
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port")


def free_port_range(count: int) -> int:
    """First of `count` consecutive free ports."""
    for _ in range(100):
        base = free_port()
        if base + count > 65000 or _handed_out & set(range(base + 1, base + count)):
            continue
        try:
            sockets = []
            for port in range(base, base + count):
                s = socket.socket()
                s.bind(("127.0.0.1", port))
                sockets.append(s)
            _handed_out.update(range(base, base + count))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no free port range")


class LocalStack:
    def __init__(self, args: list[str], cache_dir: str, env: dict[str, str] | None = None, device: str = "cpu") -> None:
        self.port = free_port()
        self.worker_base_port = free_port_range(8)
        self.url = f"http://127.0.0.1:{self.port}"
        self.colocated = "--colocated" in args
        self.num_prefill = 0 if self.colocated else int(_flag(args, "--prefill", "1"))
        self.secret_file = os.path.join(cache_dir, f"secret-{self.port}")
        os.makedirs(cache_dir, exist_ok=True)
        if "--model" not in args:
            seed_demo(cache_dir)
        write_secret_file(self.secret_file)  # the stack's; the tests' own calls authenticate with it
        argv = [sys.executable, "-m", "splitserve.cli", "up", "--port", str(self.port),
                "--worker-base-port", str(self.worker_base_port), "--device", device,
                "--secret-file", self.secret_file, *args]
        self.env = dict(os.environ, SPLITSERVE_CACHE=cache_dir, PYTHONUNBUFFERED="1", **(env or {}))
        # A process group of its own, so that a stop that times out can end the whole stack: killing
        # the launcher alone left its workers running, orphaned, on a loaded machine's cores.
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env,
                                        start_new_session=True)
        self._stop_sent = False
        self.lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            if "splitserve is up" in line or "splitserve up failed" in line:
                self._ready.set()
        self._ready.set()

    def __enter__(self) -> "LocalStack":
        if not self._ready.wait(READY_TIMEOUT_S) or self.process.poll() is not None:
            self.stop()
            raise RuntimeError("stack did not start:\n" + "".join(self.lines[-40:]))
        if not any("splitserve is up" in line for line in self.lines):
            self.stop()
            raise RuntimeError("stack did not start:\n" + "".join(self.lines[-40:]))
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def begin_stop(self) -> None:
        """Send the SIGINT that stops the stack, once, without waiting (`stop` waits)."""
        if self.process.poll() is None and not self._stop_sent:
            self._stop_sent = True
            self.process.send_signal(signal.SIGINT)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.begin_stop()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:  # every process the stack started, not the launcher alone
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)

    # ---- helpers ------------------------------------------------------------------------

    def worker_address(self, role: str, index: int = 0) -> str:
        offset = index if role in ("prefill", "worker") else self.num_prefill + index
        return f"127.0.0.1:{self.worker_base_port + offset}"

    def load(self, role: str, index: int = 0):
        from splitserve.shared.grpc_channel import sync_channel
        from splitserve.shared.protocol import worker_pb2 as pb
        from splitserve.shared.protocol import worker_pb2_grpc as pb_grpc

        with sync_channel(self.worker_address(role, index), security=self.security()) as channel:
            return pb_grpc.WorkerStub(channel).GetLoad(pb.LoadRequest(), timeout=5)

    def security(self):
        from splitserve.shared.auth import grpc_token, read_secret_file
        from splitserve.shared.grpc_security import GrpcSecurity

        return GrpcSecurity(token=grpc_token(read_secret_file(self.secret_file)))

    def gateway_pid(self) -> int:
        out = subprocess.run(["pgrep", "-f", f"splitserve.cli gateway --host 127.0.0.1 --port {self.port} "],
                             capture_output=True, text=True)
        pids = [int(p) for p in out.stdout.split()]
        if len(pids) != 1:
            raise RuntimeError(f"expected one gateway process on port {self.port}, found {pids}")
        return pids[0]

    def openai(self, **kwargs):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, **kwargs)

    def async_openai(self, **kwargs):
        from openai import AsyncOpenAI

        return AsyncOpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, **kwargs)

    def worker_pid(self, role: str, index: int = 0) -> int:
        port = self.worker_address(role, index).rsplit(":", 1)[1]
        cli_role = "worker" if role == "worker" else role
        out = subprocess.run(["pgrep", "-f", f"splitserve.cli {cli_role} --host 127.0.0.1 --port {port} "],
                             capture_output=True, text=True)
        pids = [int(p) for p in out.stdout.split()]
        if len(pids) != 1:
            raise RuntimeError(f"expected one {role} process on port {port}, found {pids}")
        return pids[0]


@contextlib.contextmanager
def all_up(*servers):
    """Wait until each of `servers` is up (LocalStacks or WorkerProcesses, already started by their
    constructors, so their start-ups overlap on the cores), yield them, and stop every one at the end
    (also when a later one fails to start)."""
    with contextlib.ExitStack() as started:
        for server in servers:
            started.push(server.__exit__)  # pushed before waiting: a failure further on still stops it
        started.callback(_begin_stops, servers)  # runs first: every stack's shutdown overlaps the others'
        for server in servers:
            server.__enter__()
        yield servers


def _begin_stops(servers) -> None:
    for server in servers:
        if hasattr(server, "begin_stop"):
            server.begin_stop()


def wait_until(predicate, timeout_s: float, interval_s: float = 0.2, message: str = "condition"):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"{message} not reached within {timeout_s} s (last value {last!r})")


def process_running(pid: int) -> bool:
    """The process exists and is not a zombie (exited, not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def metric_total(text: str, name: str) -> float:
    """Sum of the Prometheus samples whose line starts with `name` (all label sets)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def greedy_completions(client, prompts: list[str], max_tokens: int, model: str | None = None) -> list[tuple[str, int]]:
    """(text, prompt tokens) of a greedy completion of each prompt, one request at a time, through
    the `openai` client; each must run to `max_tokens` (EOS ignored). `model`: the first served one."""
    model = model or client.models.list().data[0].id
    served = []
    for prompt in prompts:
        r = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == max_tokens
        served.append((r.choices[0].text, r.usage.prompt_tokens))
    return served


def offline_greedy_texts(model_dir: str, prompts: list[str], max_tokens: int, num_blocks: int,
                         block_size: int) -> list[str]:
    """The in-process engine's greedy texts for `prompts` (EOS ignored): what a served stack of
    the same checkpoint must return (`greedy_completions`)."""
    from splitserve.shared.llm import LLM
    from splitserve.shared.sampling_params import SamplingParams

    llm = LLM(model_dir, device="cpu", num_blocks=num_blocks, block_size=block_size)
    try:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    finally:
        llm.close()
    return [o.outputs[0].text for o in outs]


def _flag(args: list[str], name: str, default: str) -> str:
    return args[args.index(name) + 1] if name in args else default
