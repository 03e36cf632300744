"""loadtests/engine_calls_per_token.py: the engine's Python calls per request per decode step, counted
on a real engine run, guard the decode fast paths (a call count, not a time: deterministic)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtests"))

import engine_calls_per_token  # noqa: E402
from workload import random_prompts  # noqa: E402

# Before the decode fast paths the engine made 50 (sync) and 60 (async) calls per request-step on
# this workload; they make about 10 and 15 now. A change that puts a call or two back per request
# on the per-step path shows here.
MAX_ENGINE_CALLS_PER_REQUEST_STEP = 25


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_decode_step_costs_few_python_calls_per_request(async_scheduling):
    prompts = random_prompts(64, 16, 4096)
    result = engine_calls_per_token.measure(engine_calls_per_token.tiny_model_dir(), "cpu", prompts, 16,
                                            async_scheduling, max_num_batched_tokens=2048, steady_steps=8)
    assert 0 < result["steady_engine"] <= result["steady_all"]
    assert result["steady_engine"] < MAX_ENGINE_CALLS_PER_REQUEST_STEP, result
    assert result["run_engine"] > 0 and result["step_ms"] >= result["outside_forward_ms"] >= 0
