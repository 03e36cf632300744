"""Test support for the gateway: a SCRIPTED worker (a real gRPC server implementing the Worker
proto, no engine behind it) and a real uvicorn gateway, both on one background event loop.

The scripted worker answers from a script instead of a model: Prefill returns `tokens[0]`;
Generate streams `tokens` (or, with a KV handle, `tokens[1:]`; or what `reply` chooses for the
prompt) one per chunk, every `delay_s`
(a Session serves its requests the same way, through the worker's own session code),
ending with "length" at max_tokens or "stop" when the script runs out. It records every call,
every Abort and every Generate the client cancelled, so tests can see what reached a worker.
`die_after_tokens` stops the whole gRPC server mid-stream (a worker crash as the gateway sees it).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import uvicorn

from splitserve.services.worker.session import serve_session
from splitserve.shared.grpc_channel import add_port, aio_server
from splitserve.shared.protocol import convert, worker_pb2 as pb, worker_pb2_grpc


@dataclass
class Script:
    tokens: list[int]
    delay_s: float = 0.0
    prefill_delay_s: float = 0.0
    die_after_tokens: int | None = None
    logprob: float = -0.5
    block_size: int = 4
    max_model_len: int = 256
    num_waiting_tokens: int = 0
    num_running: int = 0
    reply: Callable[[list[int]], list[int]] | None = None
    """If set, the tokens to answer a prompt with (e.g. a tool call, then text once the
    prompt holds the tool's result), instead of `tokens`."""

    def tokens_for(self, prompt_token_ids) -> list[int]:
        return self.reply(list(prompt_token_ids)) if self.reply is not None else self.tokens


@dataclass
class Record:
    prefills: list[pb.PrefillRequest] = field(default_factory=list)
    generates: list[pb.GenerateRequest] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)
    sessions: int = 0


class ScriptedWorker(worker_pb2_grpc.WorkerServicer):
    def __init__(self, role: str, script: Script, instance_id: str) -> None:
        self.role, self.script, self.instance_id = role, script, instance_id
        self.record = Record()
        self.server: grpc.aio.Server | None = None
        self.stopped: asyncio.Future | None = None

    def _top(self, token_id: int, k: int) -> list[pb.TopLogprob]:
        return [pb.TopLogprob(token_id=token_id + j, logprob=self.script.logprob - j) for j in range(k)]

    async def Prefill(self, request, context):
        self.record.prefills.append(request)
        await asyncio.sleep(self.script.prefill_delay_s)
        tokens = self.script.tokens_for(request.prompt_token_ids)
        first = tokens[0]
        k = request.sampling_params.logprobs if request.sampling_params.HasField("logprobs") else 0
        resp = pb.PrefillResponse(request_id=request.request_id, num_prompt_tokens=len(request.prompt_token_ids),
                                  first_token=pb.FirstToken(token_id=first, logprob=self.script.logprob, rank=1,
                                                            top_logprobs=self._top(first, k)))
        if request.sampling_params.max_tokens == 1 or len(tokens) == 1:
            resp.finish_reason = "length" if request.sampling_params.max_tokens == 1 else "stop"
        else:
            resp.kv_handle.CopyFrom(pb.KvHandle(version=1, instance_id=self.instance_id,
                                                request_id=request.request_id, block_ids=[0, 1],
                                                num_tokens=len(request.prompt_token_ids)))
        return resp

    async def Generate(self, request, context):
        async for chunk in self.open_stream(request):
            yield chunk

    async def Session(self, request_iterator, context):
        self.record.sessions += 1
        async for output in serve_session(request_iterator, self.open_stream):
            yield output

    async def open_stream(self, request):
        self.record.generates.append(request)
        params = request.sampling_params
        wants_logprobs = params.HasField("logprobs")
        k = params.logprobs if wants_logprobs else 0
        max_tokens = params.max_tokens if params.HasField("max_tokens") else self.script.max_model_len
        emitted = 1 if request.HasField("kv_handle") else 0
        tokens = self.script.tokens_for(request.prompt_token_ids)
        try:
            for token in tokens[emitted:max_tokens]:
                await asyncio.sleep(self.script.delay_s)
                emitted += 1
                if self.script.die_after_tokens is not None and emitted > self.script.die_after_tokens:
                    # Stop the server from outside this RPC (stopping cancels every RPC, this one too).
                    self.stopped = asyncio.ensure_future(self.server.stop(grace=None))
                    await asyncio.sleep(30)
                chunk = pb.GenerateChunk(request_id=request.request_id, token_ids=[token])
                if wants_logprobs:
                    chunk.logprobs.append(self.script.logprob)
                    chunk.ranks.append(1)
                    chunk.top_logprobs.append(pb.TopLogprobs(entries=self._top(token, k)))
                if emitted == max_tokens or emitted == len(tokens):
                    chunk.finish_reason = "length" if emitted == max_tokens else "stop"
                    chunk.stats.num_prompt_tokens = len(request.prompt_token_ids)
                    chunk.stats.kv_bytes_received = 4096 if request.HasField("kv_handle") else 0
                yield chunk
            self.record.completed.append(request.request_id)
        except asyncio.CancelledError:
            self.record.cancelled.append(request.request_id)
            raise

    async def Abort(self, request, context):
        self.record.aborts.append(request.request_id)
        return pb.AbortResponse(found=True)

    async def GetLoad(self, request, context):
        return convert.load_to_proto(convert.WorkerLoad(
            instance_id=self.instance_id, role=self.role, model_name="scripted", max_model_len=self.script.max_model_len,
            block_size=self.script.block_size, num_waiting_tokens=self.script.num_waiting_tokens,
            num_running=self.script.num_running,
            num_free_blocks=100, num_total_blocks=100))

    async def Health(self, request, context):
        return pb.HealthResponse(ready=True, instance_id=self.instance_id)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def stop_scripted_worker(worker: ScriptedWorker) -> None:
    if worker.stopped is None:
        worker.stopped = asyncio.ensure_future(worker.server.stop(grace=None))
    await worker.stopped


class BackgroundLoop:
    """An asyncio loop on a daemon thread; `call(coro_fn)` runs a coroutine there and waits (bounded)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def call(self, coro_fn: Callable, timeout_s: float = 10.0):
        async def run():
            return await coro_fn()
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


async def start_scripted_worker(role: str, script: Script, name: str, port: int = 0,
                                host: str = "127.0.0.1") -> tuple[ScriptedWorker, str]:
    worker = ScriptedWorker(role, script, name)
    server = aio_server()
    worker_pb2_grpc.add_WorkerServicer_to_server(worker, server)
    port = add_port(server, f"{host}:{port}")
    await server.start()
    worker.server = server
    return worker, f"{host}:{port}"


class GatewayServer:
    """A real uvicorn server running `app` on the background loop."""

    def __init__(self, loop: BackgroundLoop, app) -> None:
        self.loop, self.port = loop, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.server.install_signal_handlers = lambda: None  # not the main thread
        self._task = asyncio.run_coroutine_threadsafe(self.server.serve(), loop.loop)
        wait_until(lambda: self.server.started, timeout_s=60, what="uvicorn start")

    def stop(self) -> None:
        self.server.should_exit = True
        self._task.result(timeout=60)


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.01)
