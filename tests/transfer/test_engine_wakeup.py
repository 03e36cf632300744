"""The engine process with only KV in flight sleeps until its connector reports, instead of stepping
on a timer: a decode engine's load that nobody answers, counted in its step trace."""

from __future__ import annotations

import asyncio
import csv
import functools
import glob
import socket

import pytest

from splitserve.shared.async_engine import AsyncEngine
from splitserve.shared.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from splitserve.shared.engine_process import IDLE_POLL_MS
from splitserve.shared.runner import SampledToken
from splitserve.shared.sampling_params import SamplingParams
from splitserve.shared.transfer.handle import KV_HANDLE_VERSION, KvHandle

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

LOAD_TIMEOUT_S = 1.0


def decode_connector(parts):
    """The engine process's connector: a real decode side (UCX over TCP), its loads bounded."""
    from splitserve.shared.transfer.connector import TransferConfig, TransferConnector

    return TransferConnector(parts.kv_cache, TransferConfig(role="decode", ucx_tls="tcp", model_id="wakeup",
                                                            timeout_s=LOAD_TIMEOUT_S))


def _unanswered_address() -> str:
    """A control address where nothing listens: the load's messages go unanswered."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


def test_a_load_in_flight_is_slept_through_until_it_fails_then_recomputed(checkpoint_factory, tmp_path):
    config = EngineConfig(model=ModelConfig(model=checkpoint_factory("llama"), device="cpu"),
                          cache=CacheConfig(num_blocks=64, block_size=4),
                          scheduler=SchedulerConfig(step_trace=str(tmp_path / "steps-{pid}.csv")))
    engine = AsyncEngine(config, "decode", functools.partial(decode_connector))
    prompt = list(range(10, 22))
    handle = KvHandle(KV_HANDLE_VERSION, "gone-prefill", "r", (0, 1, 2), len(prompt), "another-layout",
                      _unanswered_address())

    async def run() -> list[int]:
        tokens = []
        async for out in engine.generate("r", prompt, SamplingParams(max_tokens=4, temperature=0), kv_handle=handle,
                                         first_token=SampledToken(5, 0.0, 1, ())):
            tokens += out.new_token_ids
        return tokens

    try:
        tokens = asyncio.run(asyncio.wait_for(run(), 120))
    finally:
        engine.shutdown(timeout_s=120)
    assert len(tokens) == 3 and engine.process.exitcode == 0  # the first token came with the handle

    [trace] = glob.glob(str(tmp_path / "steps-*.csv"))
    steps = list(csv.DictReader(open(trace)))
    # One step started the load (nothing to compute yet), the failure's wake-up ran the recompute.
    recompute = next(i for i, s in enumerate(steps) if int(s["tokens"]) > 1)
    started = next(i for i, s in enumerate(steps) if int(s["requests"]) == 0)
    in_flight_s = float(steps[recompute]["start_s"]) - float(steps[started]["start_s"])
    idle_steps = recompute - started - 1
    # Only the idle poll's timeout may step while the load is in flight (a timer-driven loop
    # stepped every 0.5 ms: thousands of steps in this window).
    assert in_flight_s >= LOAD_TIMEOUT_S * 0.9, steps[:recompute + 1]
    assert idle_steps <= in_flight_s / (IDLE_POLL_MS / 1e3) + 1, (idle_steps, in_flight_s)
