"""`--step-trace`: the engine writes one line per step, and the summary reads the run back."""

from __future__ import annotations

import sys
from pathlib import Path

from splitserve import LLM, SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtests"))

import step_trace_summary  # noqa: E402


def test_the_trace_of_an_offline_run_accounts_for_every_step_and_token(checkpoint_factory, tmp_path):
    path = tmp_path / "trace.csv"
    llm = LLM(checkpoint_factory("llama"), device="cpu", num_blocks=64, block_size=4, max_num_seqs=4,
              max_num_batched_tokens=8, step_trace=str(path))
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13, 14], [15, 16]]
    outs = llm.generate(prompts, SamplingParams(max_tokens=5, ignore_eos=True, temperature=0.0))
    llm.engine.close()
    steps = step_trace_summary.read_trace(str(path))
    summary = step_trace_summary.summarize(step_trace_summary.last_burst(steps, idle_gap_s=60.0))
    assert summary["steps"] == len(steps) > 0
    assert summary["outputs"] == sum(len(o.outputs[0].token_ids) for o in outs) == 20
    # 16 prompt tokens at 8 a step take at least two mixed steps; the last steps decode all four
    assert summary["mixed_steps"] >= 2 and summary["decode_steps"] >= 4 and summary["decode_batch_p50"] >= 1
    assert sum(s["tokens"] for s in steps) == 16 + 4 * 4  # every prompt token, then 4 more per request
    starts = [s["start_s"] for s in steps]
    assert starts == sorted(starts) and all(s["step_ms"] >= 0 for s in steps)
