"""The engine behind asyncio: streaming, early exit, external abort, bad requests; blocks always return."""

from __future__ import annotations

import asyncio
import multiprocessing

import pytest

from splitserve.shared.async_engine import AsyncEngine, EngineStartupError
from splitserve.shared.config import CacheConfig, EngineConfig, ModelConfig
from splitserve.shared.engine import RequestError
from splitserve.shared.engine_protocol import AddRequest, command_decoder, encoder
from splitserve.shared.request import SessionHint
from splitserve.shared.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def engine(checkpoint_factory):
    config = EngineConfig(model=ModelConfig(model=checkpoint_factory("llama"), device="cpu"),
                          cache=CacheConfig(num_blocks=64, block_size=4))
    eng = AsyncEngine(config, "colocated")
    yield eng
    eng.shutdown(timeout_s=120)  # generous: a loaded machine is slow to exit, and this is not a timing test
    assert eng.process.exitcode == 0  # the engine process took the Shutdown command and exited cleanly


def _free_blocks_settle(engine, expected: int) -> None:
    async def wait():
        for _ in range(200):
            if engine.load().num_free_blocks == expected and engine.load().num_running == 0:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"free blocks {engine.load().num_free_blocks} != {expected}")

    asyncio.run(wait())


def test_the_engine_process_leaves_a_core_to_its_server_by_default(engine):
    from splitserve.shared.engine_parts import usable_cores

    assert engine.torch_threads == max(1, usable_cores() - 1)  # ParallelConfig.cpu_threads unset, on CPU


def test_stream_to_the_end(engine):
    async def run():
        outs = [o async for o in engine.generate("a", [5, 6, 7, 8, 9], SamplingParams(max_tokens=6, ignore_eos=True))]
        return outs

    outs = asyncio.run(run())
    assert sum(len(o.new_token_ids) for o in outs) == 6
    assert outs[-1].finished and outs[-1].finish_reason == "length" and outs[-1].num_prompt_tokens == 5
    _free_blocks_settle(engine, 64)


def test_a_session_hint_crosses_to_the_engine_process(engine):
    """prompt_cache_key's hint travels in the AddRequest command; a keyed turn runs and its
    follow-up reuses the turn's blocks."""
    session = SessionHint("agent-1", 600.0)
    command = AddRequest("r", [1, 2], SamplingParams(), session=session)
    assert command_decoder.decode(encoder.encode(command)).session == session

    async def turn(request_id, prompt):
        return [o async for o in engine.generate(request_id, prompt, SamplingParams(max_tokens=2, ignore_eos=True),
                                                 session=session)]

    first = asyncio.run(turn("s-0", list(range(10, 22))))
    assert first[-1].finished and sum(len(o.new_token_ids) for o in first) == 2
    follow_up = asyncio.run(turn("s-1", list(range(10, 22)) + [o.new_token_ids[0] for o in first][:1] + [3, 4]))
    assert follow_up[-1].finished and follow_up[-1].num_cached_tokens >= 12


def test_a_lagging_consumer_gets_merged_deltas_with_every_token_in_order(engine):
    """A consumer that stops reading while the engine runs on gets what piled up as one delta;
    the tokens are those of a consumer that kept up (greedy), in order, with one final output."""
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=1)

    async def eager():
        return [o async for o in engine.generate("keeps-up", [5, 6, 7, 8, 9], params)]

    async def lagging():
        stream = engine.generate("lags", [5, 6, 7, 8, 9], params)
        first = await stream.__anext__()
        for _ in range(3000):  # let the engine finish the request unread (its stats say so)
            if engine.load().num_running == 0 and engine.load().num_waiting == 0:
                break
            await asyncio.sleep(0.01)
        return [first] + [o async for o in stream]

    kept_up, lagged = asyncio.run(eager()), asyncio.run(lagging())

    def tokens(outs):
        return [t for o in outs for t in o.new_token_ids]

    assert len(lagged) < 12 and max(len(o.new_token_ids) for o in lagged) > 1
    assert tokens(lagged) == tokens(kept_up) and len(tokens(lagged)) == 12
    merged = [x for o in lagged for x in o.new_logprobs]
    assert merged == pytest.approx([x for o in kept_up for x in o.new_logprobs])
    assert [len(o.new_top_logprobs) for o in lagged] == [len(o.new_token_ids) for o in lagged]
    assert [o.finished for o in lagged] == [False] * (len(lagged) - 1) + [True]
    assert lagged[-1].finish_reason == "length" and lagged[-1].num_prompt_tokens == 5
    _free_blocks_settle(engine, 64)


def test_leaving_the_stream_aborts_and_frees(engine):
    async def run():
        stream = engine.generate("b", list(range(5, 30)), SamplingParams(max_tokens=200, ignore_eos=True))
        async for out in stream:
            if out.new_token_ids:
                break
        await stream.aclose()

    asyncio.run(run())
    _free_blocks_settle(engine, 64)


def test_external_abort_ends_the_stream(engine):
    async def run():
        seen = []
        async for out in engine.generate("c", list(range(5, 30)), SamplingParams(max_tokens=200, ignore_eos=True)):
            seen.append(out)
            if len(seen) == 2:
                engine.abort("c")  # as the Abort RPC does, while the stream is still being read
        return seen

    seen = asyncio.run(asyncio.wait_for(run(), timeout=30))
    assert seen[-1].finished and seen[-1].finish_reason == "abort"
    _free_blocks_settle(engine, 64)


def test_bad_request_raises_from_generate(engine):
    async def run():
        async for _ in engine.generate("d", [5] * 10_000, SamplingParams(max_tokens=2)):
            pass

    with pytest.raises(RequestError, match="maximum context length"):
        asyncio.run(asyncio.wait_for(run(), timeout=30))


def test_an_engine_that_cannot_start_is_a_clear_startup_error(tmp_path):
    """A bad checkpoint fails in the engine process; the reason comes back as EngineStartupError
    (the worker turns it into a start-up failure, exit code 1), and the process is gone."""
    (tmp_path / "config.json").write_text("{this is not json")
    config = EngineConfig(model=ModelConfig(model=str(tmp_path), device="cpu"), cache=CacheConfig(num_blocks=8))
    with pytest.raises(EngineStartupError, match="the engine could not start: .*") as failure:
        AsyncEngine(config, "prefill")
    assert "json" in str(failure.value).lower() or "config" in str(failure.value).lower()
    assert not [p for p in multiprocessing.active_children() if p.name == "splitserve-engine-prefill"]
