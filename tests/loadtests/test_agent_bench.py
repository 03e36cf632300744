"""The multi-turn agent benchmark, tiny on CPU: the real stack in two modes, JSON + PNG written,
and the summary arithmetic by hand-computed values."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "loadtests"))
sys.path.insert(0, str(REPO_ROOT / "tests" / "services"))

import agent_bench  # noqa: E402


def test_summary_counts_cached_fraction_recompute_and_task_time():
    result = agent_bench.ModeResult("tier", wall_s=2.0, session_start_s={0: 0.0, 1: 1.0})
    result.turns = [agent_bench.TurnResult(0, 0, 100, 0, 10, 0.5, 1.0),
                    agent_bench.TurnResult(0, 1, 130, 96, 10, 0.1, 2.0),
                    agent_bench.TurnResult(1, 0, 100, 48, 10, 0.3, 1.5),
                    agent_bench.TurnResult(1, 1, 130, 0, 0, 0.0, 1.6, error="HTTP 503")]
    s = agent_bench.summarize(result, 16)
    assert s["turns_ok"] == 3 and s["turns_failed"] == 1
    assert s["cached_fraction"] == pytest.approx(144 / 330) and s["recomputed_prompt_tokens"] == 330 - 144
    assert s["output_tok_s"] == pytest.approx(15.0)
    assert s["by_turn"][1]["ttft_p50_ms"] == pytest.approx(100.0)
    assert s["task_time_p50_s"] == pytest.approx(1.25)  # sessions took 2.0 s and 0.5 s


@pytest.mark.slow
def test_agent_bench_runs_tiny_on_cpu(tmp_path):
    out = subprocess.run(
        [sys.executable, str(REPO_ROOT / "loadtests" / "agent_bench.py"), "--model", "demo", "--device", "cpu",
         "--sessions", "3", "--turns", "2", "--system-len", "32", "--first-len", "16", "--tool-len", "8",
         "--output-len", "4", "--num-blocks", "8", "--kv-offload-gib", "0.01", "--think-s", "0.1",
         "--arrival-s", "0.1", "--modes", "no-tier,disagg+next-turn", "--start-stacks-together", "--out-dir", str(tmp_path),
         "--disable-tqdm"],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "no-tier" in out.stdout and "disagg+next-turn" in out.stdout and "turn 1 TTFT p50 ms" in out.stdout
    report = json.loads((tmp_path / "agent_bench.json").read_text())
    plain, next_turn = report["modes"]
    assert plain["turns_ok"] == next_turn["turns_ok"] == 6
    assert next_turn["counters"]["gateway"]["routes_session_on_decode"] > 0  # a later turn ran on its decode
    assert next_turn["cached_fraction"] >= plain["cached_fraction"] > 0  # (the GPU run measures the gap)
    assert (tmp_path / "agent_ttft_by_turn.png").stat().st_size > 1000
