"""idle_step_probe.py: each lone request after a pause is timed step by step until it finishes."""

from __future__ import annotations

import sys
from pathlib import Path

from splitserve import LLM

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtests"))

import idle_step_probe  # noqa: E402


def test_every_lone_request_runs_to_its_end_and_each_step_is_timed(checkpoint_factory, capsys):
    llm = LLM(checkpoint_factory("llama"), device="cpu", num_blocks=64, block_size=4, async_scheduling=True)
    prompts = [[5 + i, 6, 7, 8, 9, 10 + i] for i in range(4)]
    results = idle_step_probe.probe(llm, [0.0, 0.01], prompts, profile=True, max_tokens=3)
    assert len(results) == 2
    for first, again in results:
        # async: the three tokens come from three launched steps, and one more step books the last
        assert len(first) == len(again) == 4 and all(t >= 0 for t in first + again)
    assert not llm.engine.has_unfinished_requests()
    assert "engine.py" in capsys.readouterr().out  # the profile of the step after the longest pause
