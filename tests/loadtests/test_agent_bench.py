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
    assert s["later_turns_recomputed_tokens"] == 130 - 96 and s["probe"] is None


TINY = dict(sessions=3, turns=2, system=16, first=80, tool=8, output=4, block=16, blocks=8, pairs=3)
"""CPU-sized small pool: a session's turn needs 7 of the 8 blocks, so each session's turn 0 (the
three arrive at once and run one after another) evicts the one before it, and at least two later
turns find their history gone from the device: no-tier recomputes it, the tier restores it. (The
disaggregated modes' next-turn counters: tests/services/test_sessions_e2e.py.)"""


@pytest.mark.slow
@pytest.mark.timeout(600)  # three stacks at once on a loaded 2-core box
def test_agent_bench_runs_tiny_on_cpu(tmp_path):
    t = TINY
    out = subprocess.run(
        [sys.executable, str(REPO_ROOT / "loadtests" / "agent_bench.py"), "--model", "demo", "--device", "cpu",
         "--sessions", str(t["sessions"]), "--turns", str(t["turns"]), "--system-len", str(t["system"]),
         "--first-len", str(t["first"]), "--tool-len", str(t["tool"]), "--output-len", str(t["output"]),
         "--num-blocks", str(t["blocks"]), "--kv-offload-gib", "0.01", "--think-s", "0.1", "--arrival-s", "0",
         "--probe-pairs", str(t["pairs"]), "--probe-num-blocks", "32",
         "--modes", "no-tier,tier,retained-vs-fresh", "--start-stacks-together", "--out-dir", str(tmp_path),
         "--disable-tqdm"],
        capture_output=True, text=True, timeout=540)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "no-tier" in out.stdout and "retained-vs-fresh" in out.stdout and "turn 1 TTFT p50 ms" in out.stdout
    assert "retained / fresh TTFT" in out.stdout
    report = json.loads((tmp_path / "agent_bench.json").read_text())
    plain, tier, probe = report["modes"]
    assert plain["turns_ok"] == tier["turns_ok"] == t["sessions"] * t["turns"]
    # A later turn that kept its history computes its new tokens and at most one partly filled block.
    kept_bound = t["sessions"] * (t["turns"] - 1) * (t["tool"] + t["output"] + t["block"])
    assert plain["later_turns_recomputed_tokens"] > kept_bound  # the pool did not hold the sessions
    assert tier["later_turns_recomputed_tokens"] < plain["later_turns_recomputed_tokens"]
    worker = tier["counters"]["worker"]
    assert worker["host_hit_blocks"] > 0 and worker["restore_blocks"] > 0 and worker["restores_failed"] == 0
    assert "restore_blocks" not in plain["counters"]["worker"]  # no tier there
    assert (tmp_path / "agent_ttft_by_turn.png").stat().st_size > 1000
    assert_probe(probe["probe"])


def assert_probe(probe: dict) -> None:
    """Each retained turn kept its history on the device (no restore) and its fresh twin had
    nothing cached, with as many tokens as that turn computed (its new tokens, a partial block)."""
    t = TINY
    assert probe["pairs"] == t["pairs"] and probe["restored_blocks"] == 0 and probe["fresh_cached_tokens"] == 0
    assert t["tool"] + t["output"] <= probe["new_tokens_mean"] <= t["tool"] + t["output"] + t["block"]
    assert probe["retained_cached_fraction"] > 0.5
    assert probe["retained_ttft_p50_ms"] > 0 and probe["fresh_ttft_p50_ms"] > 0 and probe["retained_over_fresh"] > 0


def test_probe_summary_pairs_retained_turns_with_fresh_prompts():
    result = agent_bench.ModeResult(agent_bench.PROBE, wall_s=1.0, counters={"worker": {"restore_blocks": 0}})
    result.turns = [agent_bench.TurnResult(0, 0, 100, 0, 4, 0.30, 0.3, kind="warm"),
                    agent_bench.TurnResult(0, 1, 120, 96, 4, 0.06, 0.4, kind="retained"),
                    agent_bench.TurnResult(1, 1, 24, 0, 1, 0.04, 0.5, kind="fresh"),
                    agent_bench.TurnResult(0, 2, 140, 128, 4, 0.05, 0.6, kind="retained"),
                    agent_bench.TurnResult(1, 2, 12, 0, 1, 0.05, 0.7, kind="fresh")]
    s = agent_bench.summarize(result, 16)
    assert s["turns_ok"] == 3  # the fresh prompts are the probe's, not the session's
    p = s["probe"]
    assert p["pairs"] == 2 and p["new_tokens_mean"] == pytest.approx(18.0)
    assert p["retained_ttft_p50_ms"] == pytest.approx(55.0) and p["fresh_ttft_p50_ms"] == pytest.approx(45.0)
    assert p["retained_over_fresh"] == pytest.approx(55 / 45)
    assert p["retained_cached_fraction"] == pytest.approx(224 / 260) and p["restored_blocks"] == 0
    assert agent_bench.summarize(agent_bench.ModeResult("tier", turns=result.turns[:2]), 16)["probe"] is None
