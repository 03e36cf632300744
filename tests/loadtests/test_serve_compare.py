"""The colocated-vs-disaggregated serving comparison, run for real on CPU: both stacks start, the
serving client completes every request at each rate, the disaggregated stack moves KV over UCX
instead of recomputing, and the comparison is written out."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "loadtests"))

import serve_compare  # noqa: E402


@pytest.mark.slow
def test_serve_compare_runs_both_topologies_on_cpu(tmp_path):
    out = subprocess.run(
        [sys.executable, str(REPO_ROOT / "loadtests" / "serve_compare.py"), "--model", "demo", "--device", "cpu",
         "--rates", "8,inf", "--num-prompts", "8", "--input-len", "48", "--output-len", "8", "--max-num-seqs", "16",
         "--max-num-batched-tokens", "512", "--ucx-tls", "tcp", "--goodput", "tpot:5000", "--start-stacks-together",
         "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=280,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    compare = json.loads((tmp_path / "compare.json").read_text())["results"]
    assert set(compare) == {"colocated", "disaggregated"}
    for name, runs in compare.items():
        assert [run["request_rate"] for run in runs] == [8.0, "inf"]
        for run in runs:
            summary = run["summary"]
            assert (summary["completed"], summary["failed"]) == (8, 0), (name, summary["errors"])
            assert summary["total_output_tokens"] == 8 * 8
            assert summary["goodput"] == pytest.approx(summary["request_throughput"])  # a 5 s TPOT SLO holds
    assert compare["colocated"][0]["kv_bytes"] == 0
    assert compare["disaggregated"][0]["kv_bytes"] > 0
    assert compare["disaggregated"][0]["recomputed_tokens"] == 0
    assert "disaggregated" in out.stdout and "TTFT p99" in out.stdout


def test_colocated_workers_become_up_workers_that_up_accepts():
    """`--colocated-workers 2` (the two-GPU baseline) is `splitserve up --workers 2`. The CPU run above
    keeps one colocated worker: a second costs a worker start-up, and test_stack_failures.py serves
    from two colocated workers."""
    from splitserve.cli import build_parser

    flags = serve_compare.topology_args("colocated", argparse.Namespace(colocated_workers=2))
    assert flags == ["--colocated", "--workers", "2"]
    assert build_parser().parse_args(["up", *flags]).workers == 2


def test_gpu_suite_script_parses_and_rejects_unknown_steps(tmp_path):
    script = REPO_ROOT / "loadtests" / "gpu_suite.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    out = subprocess.run(["bash", str(script), "no-such-step"], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path)})
    assert out.returncode == 2 and "unknown step no-such-step" in out.stdout
