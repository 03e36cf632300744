"""The worker Session (many Generates on one gRPC stream) end to end over real gRPC.

Worker side: a real `WorkerServicer` over a real engine (the llama test checkpoint on CPU) behind a
real aio gRPC server, driven by a raw Session call: per-step batching, same tokens as the Generate
RPC, in-band errors that leave the session running, abort, and the call ending, with every block
back in the pool. Gateway side: `WorkerClient` against a scripted worker: one session for many
requests, merging for a lagging consumer, the per-request deadline, and a new session after a
failed one.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from scripted_worker import Script, start_scripted_worker, stop_scripted_worker
from splitserve.services.gateway.worker_client import WorkerClient, WorkerError, WorkerRequest
from splitserve.services.worker.config import SessionConfig
from splitserve.services.worker.servicer import WorkerServicer
from splitserve.shared.async_engine import AsyncEngine
from splitserve.shared.config import CacheConfig, EngineConfig, ModelConfig
from splitserve.shared.grpc_channel import add_port, aio_channel, aio_server
from splitserve.shared.protocol import convert, worker_pb2 as pb, worker_pb2_grpc
from splitserve.shared.sampling_params import SamplingParams

NUM_BLOCKS = 64


@pytest.fixture(scope="module")
def engine(checkpoint_factory):
    config = EngineConfig(model=ModelConfig(model=checkpoint_factory("llama"), device="cpu"),
                          cache=CacheConfig(num_blocks=NUM_BLOCKS, block_size=4))
    eng = AsyncEngine(config, "colocated")
    yield eng
    eng.shutdown()


def _generate(request_id: str, prompt: list[int], max_tokens: int) -> pb.GenerateRequest:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return pb.GenerateRequest(request_id=request_id, prompt_token_ids=prompt,
                              sampling_params=convert.sampling_params_to_proto(params))


UNBOUNDED = SessionConfig(max_hold_ms=0, max_merged_tokens=0)


@contextlib.asynccontextmanager
async def _serving(engine, session_config: SessionConfig = SessionConfig()):
    """A real aio gRPC server over the engine, and a stub connected to it."""
    server = aio_server()
    worker_pb2_grpc.add_WorkerServicer_to_server(WorkerServicer(engine, session_config), server)
    port = add_port(server, "127.0.0.1:0")
    await server.start()
    channel = aio_channel(f"127.0.0.1:{port}")
    try:
        yield worker_pb2_grpc.WorkerStub(channel)
    finally:
        await channel.close()
        await server.stop(None)


async def _next(outputs) -> pb.SessionOutput:
    """The session's next message, within 30 s."""
    return await asyncio.wait_for(outputs.__anext__(), 30)


async def _blocks_back(engine) -> None:
    for _ in range(500):
        load = engine.load()
        if load.num_free_blocks == NUM_BLOCKS and load.num_running == 0 and load.num_waiting == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{engine.load().num_free_blocks} of {NUM_BLOCKS} blocks free")


class _Commands:
    """The client half of a Session: commands are put here and gRPC drains them."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()

    def send(self, **command) -> None:
        self.queue.put_nowait(pb.SessionCommand(**command))

    async def __aiter__(self):
        while (command := await self.queue.get()) is not None:
            yield command


def test_session_batches_each_step_and_gives_the_generate_rpc_tokens(engine):
    prompts = {f"r{i}": [3 + i, 17, 29 + 2 * i, 41, 5 + i] for i in range(6)}

    async def run():
        async with _serving(engine) as stub:
            reference = {}
            for rid, prompt in prompts.items():
                chunks = [c async for c in stub.Generate(_generate(f"ref-{rid}", prompt, 8), timeout=60)]
                reference[rid] = [t for c in chunks for t in c.token_ids]
            commands = _Commands()
            call = stub.Session(commands.__aiter__(), timeout=60)
            for rid, prompt in prompts.items():
                commands.send(generate=_generate(rid, prompt, 8))
            tokens = {rid: [] for rid in prompts}
            finished, widest = set(), 0
            async for output in call:
                widest = max(widest, len({c.request_id for c in output.chunks}))
                assert len({c.request_id for c in output.chunks}) == len(output.chunks)  # one chunk per request
                for chunk in output.chunks:
                    assert not chunk.HasField("error"), chunk.error.message
                    tokens[chunk.request_id].extend(chunk.token_ids)
                    if chunk.HasField("finish_reason"):
                        assert chunk.finish_reason == "length" and chunk.stats.num_prompt_tokens == 5
                        finished.add(chunk.request_id)
                if finished == set(prompts):
                    commands.queue.put_nowait(None)  # half-close: the session ends once its requests have
            assert finished == set(prompts)
            assert tokens == reference
            assert widest >= 2, "no message carried more than one request's step"
            await _blocks_back(engine)

    asyncio.run(run())


def test_session_errors_are_in_band_and_abort_and_hang_up_free_the_blocks(engine):
    async def run():
        async with _serving(engine) as stub:
            commands = _Commands()
            call = stub.Session(commands.__aiter__(), timeout=60)
            outputs = call.__aiter__()

            async def next_chunks() -> dict[str, pb.GenerateChunk]:
                return {c.request_id: c for c in (await _next(outputs)).chunks}

            commands.send(generate=_generate("long", [5, 6, 7, 8], 200))
            first = await next_chunks()
            assert first["long"].token_ids and not first["long"].HasField("finish_reason")
            # A second request with an open id, and one this worker cannot serve: both fail in band.
            commands.send(generate=_generate("long", [9, 9], 4))
            bad = _generate("handoff", [5, 6], 4)
            bad.kv_handle.CopyFrom(pb.KvHandle(version=1, instance_id="x", request_id="handoff", block_ids=[0]))
            commands.send(generate=bad)
            errors = {}
            while len(errors) < 2:
                for rid, chunk in (await next_chunks()).items():
                    if chunk.HasField("error"):
                        errors[rid] = chunk.error.code
            assert errors == {"long": grpc.StatusCode.ALREADY_EXISTS.value[0],
                              "handoff": grpc.StatusCode.FAILED_PRECONDITION.value[0]}
            # The session goes on: abort the long request, then a short one runs to its end.
            commands.send(abort=pb.AbortRequest(request_id="long"))
            commands.send(generate=_generate("short", [11, 12, 13], 3))
            short = []
            while True:
                chunks = await next_chunks()
                short.extend(chunks["short"].token_ids if "short" in chunks else [])
                if "short" in chunks and chunks["short"].HasField("finish_reason"):
                    break
            assert len(short) == 3
            await _blocks_back(engine)  # the aborted request's blocks are back too
            # Hanging up with a request open aborts it on the worker.
            commands.send(generate=_generate("orphan", [21, 22, 23], 200))
            await next_chunks()
            call.cancel()
            await _blocks_back(engine)

    asyncio.run(run())


def test_without_credit_the_worker_holds_and_merges_then_sends_one_chunk(engine):
    """A client that granted one message gets one; everything the engine produces after it waits,
    merged per request, until the client grants another (merging unbounded here)."""
    async def run():
        async with _serving(engine, UNBOUNDED) as stub:
            commands = _Commands()
            call = stub.Session(commands.__aiter__(), timeout=60)
            outputs = call.__aiter__()
            commands.send(credit=1)
            commands.send(generate=_generate("held", [5, 6, 7, 8], 12))
            first = (await _next(outputs)).chunks
            assert len(first) == 1 and not first[0].HasField("finish_reason")
            for _ in range(1000):  # the engine finishes the request; its chunks wait in the outbox
                if engine.load().num_running == 0 and engine.load().num_waiting == 0:
                    break
                await asyncio.sleep(0.01)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(pending := asyncio.ensure_future(outputs.__anext__())), 0.3)
            commands.send(credit=1)
            rest = (await asyncio.wait_for(pending, 30)).chunks
            assert len(rest) == 1 and rest[0].finish_reason == "length"
            assert len(first[0].token_ids) + len(rest[0].token_ids) == 12 and len(rest[0].token_ids) > 1
            commands.queue.put_nowait(None)
            assert [o async for o in outputs] == []

    asyncio.run(run())


def _reference_tokens(stub, rid: str, prompt: list[int], max_tokens: int):
    async def run():
        chunks = [c async for c in stub.Generate(_generate(rid, prompt, max_tokens), timeout=60)]
        return [t for c in chunks for t in c.token_ids]
    return run()


def test_a_chunk_that_reached_the_token_bound_goes_out_borrowing_one_credit(engine):
    """max_merged_tokens=3, no time bound, one credit: the first message uses it; then a chunk
    that reached 3 tokens goes out ahead of credit, borrowing it, and nothing more comes until the
    client grants again (one message borrowed at most: a slow client gets merged chunks, never a
    backlog). Tokens are those of the Generate RPC, in order."""
    prompt, max_tokens = [5, 6, 7, 8], 12

    async def run():
        async with _serving(engine, SessionConfig(max_hold_ms=0, max_merged_tokens=3)) as stub:
            reference = await _reference_tokens(stub, "ref-capped", prompt, max_tokens)
            commands = _Commands()
            outputs = stub.Session(commands.__aiter__(), timeout=60).__aiter__()
            commands.send(credit=1)
            commands.send(generate=_generate("capped", prompt, max_tokens))
            tokens = list((await _next(outputs)).chunks[0].token_ids)
            (borrowed,) = (await _next(outputs)).chunks  # ahead of credit: it reached the bound
            assert len(borrowed.token_ids) >= 3 or borrowed.HasField("finish_reason")
            tokens += borrowed.token_ids
            finished = borrowed.HasField("finish_reason")
            if not finished:  # the debt is not repaid: the rest waits, merging, however long it takes
                await _blocks_back(engine)  # the engine ran the request to its end meanwhile
                commands.send(credit=1)  # repays the debt; the overfull rest then borrows again
                (chunk,) = (await _next(outputs)).chunks  # all of the rest: nothing went out unasked
                tokens += chunk.token_ids
                finished = chunk.HasField("finish_reason")
            assert finished and tokens == reference
            commands.queue.put_nowait(None)
            assert [o async for o in outputs] == []
            await _blocks_back(engine)

    asyncio.run(run())


def test_a_chunk_held_past_the_time_bound_goes_out_borrowing_one_credit(engine):
    """max_hold_ms=1 and one credit: the first message uses it; the next goes out without another
    grant once held 1 ms (without the bound it would wait for one forever), and then nothing more
    until the client grants: the rest comes as one message."""
    async def run():
        async with _serving(engine, SessionConfig(max_hold_ms=1, max_merged_tokens=0)) as stub:
            reference = await _reference_tokens(stub, "ref-timed", [9, 8, 7, 6], 24)
            commands = _Commands()
            outputs = stub.Session(commands.__aiter__(), timeout=60).__aiter__()
            commands.send(credit=1)
            commands.send(generate=_generate("timed", [9, 8, 7, 6], 24))
            tokens, finished = [], False
            for _ in range(2):  # the granted message, then the borrowed one
                if not finished:
                    (chunk,) = (await _next(outputs)).chunks
                    tokens += chunk.token_ids
                    finished = chunk.HasField("finish_reason")
            if not finished:
                await _blocks_back(engine)
                commands.send(credit=1)
                (chunk,) = (await _next(outputs)).chunks
                tokens += chunk.token_ids
                finished = chunk.HasField("finish_reason")
            assert finished and tokens == reference
            commands.queue.put_nowait(None)
            assert [o async for o in outputs] == []

    asyncio.run(run())


# ---- the gateway's side: WorkerClient against a scripted worker -------------------------------

def _request(rid: str, max_tokens: int = 64) -> WorkerRequest:
    return WorkerRequest(rid, [1, 2, 3], SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def test_client_shares_one_session_merges_for_a_lagging_consumer_and_enforces_the_deadline():
    async def run():
        # A token every 5 ms: each goes out in its own session message, so merging is the client's.
        worker, url = await start_scripted_worker("colocated", Script(tokens=list(range(100, 140)), delay_s=0.005), "w0")
        client = WorkerClient(url)
        try:
            async def collect(rid: str, pause_s: float) -> list[list[int]]:
                chunks = []
                async for chunk in client.generate(_request(rid), timeout_s=30):
                    chunks.append(chunk.token_ids)
                    await asyncio.sleep(pause_s)
                return chunks

            # A consumer that pauses after every chunk gets the tokens that piled up, merged, in order.
            fast, slow = await asyncio.gather(collect("fast", 0.0), collect("slow", 0.05))
            assert [t for c in fast for t in c] == [t for c in slow for t in c] == list(range(100, 140))
            assert len(slow) < len(fast) and max(len(c) for c in slow) > 1
            assert worker.record.sessions == 1 and set(worker.record.completed) == {"fast", "slow"}

            # The deadline bounds the whole stream; the worker is told to stop.
            worker.script.delay_s = 0.5
            with pytest.raises(WorkerError) as failed:
                async for _ in client.generate(_request("late"), timeout_s=0.3):
                    pass
            assert failed.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            for _ in range(300):
                if "late" in worker.record.cancelled:
                    break
                await asyncio.sleep(0.01)
            assert "late" in worker.record.cancelled

            # The worker dies mid-stream: every open request fails as a worker failure, and the next
            # request (to a worker back on the same port) opens a new session.
            worker.script.delay_s, worker.script.die_after_tokens = 0.01, 3
            with pytest.raises(WorkerError) as died:
                async for _ in client.generate(_request("doomed"), timeout_s=30):
                    pass
            assert died.value.worker_failed
            await stop_scripted_worker(worker)
            port = int(url.rsplit(":", 1)[1])
            revived, _ = await start_scripted_worker("colocated", Script(tokens=[7, 8, 9]), "w0", port=port)
            try:
                for _ in range(100):  # as the router does: wait until the worker answers again
                    try:
                        await client.get_load(1.0)
                        break
                    except WorkerError:
                        await asyncio.sleep(0.1)
                tokens = [t async for c in client.generate(_request("after", 3), timeout_s=30) for t in c.token_ids]
                assert tokens == [7, 8, 9] and revived.record.sessions == 1
            finally:
                await stop_scripted_worker(revived)
        finally:
            await client.close()
            await stop_scripted_worker(worker)

    asyncio.run(run())


def test_a_large_step_is_split_into_messages_under_the_limit():
    from splitserve.services.worker.session import split_output

    chunks = [pb.GenerateChunk(request_id=f"r{i}", token_ids=list(range(1000)), logprobs=[-0.5] * 1000)
              for i in range(10)]
    one = pb.SessionOutput(chunks=chunks).ByteSize()
    messages = split_output(chunks, max_bytes=one // 3)
    assert len(messages) > 1 and all(m.ByteSize() <= one // 3 for m in messages)
    assert [c.request_id for m in messages for c in m.chunks] == [f"r{i}" for i in range(10)]
    assert split_output(chunks) == [pb.SessionOutput(chunks=chunks)]


def test_a_client_without_credit_is_not_limited():
    """session_window=0: the client never grants credit, and the worker sends every step as it comes."""
    async def run():
        worker, url = await start_scripted_worker("colocated", Script(tokens=list(range(50, 70)), delay_s=0.002), "w0")
        client = WorkerClient(url, session_window=0)
        try:
            chunks = [c.token_ids async for c in client.generate(_request("free"), timeout_s=30)]
            assert [t for c in chunks for t in c] == list(range(50, 70)) and len(chunks) > 2
        finally:
            await client.close()
            await stop_scripted_worker(worker)

    asyncio.run(run())
