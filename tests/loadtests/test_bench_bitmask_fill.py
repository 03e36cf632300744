"""The bitmask fill benchmark runs on a CPU at a tiny size and checks its masks across thread counts."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "loadtests"))

import bench_bitmask_fill  # noqa: E402


def test_tiny_run_reports_each_thread_count(tmp_path) -> None:
    out = tmp_path / "fill.json"
    result = bench_bitmask_fill.main(["--vocab-size", "1024", "--rows", "12", "--threads", "1,2", "--output-len", "3",
                                      "--steps", "4", "--warm", "1", "--result-json", str(out)])
    assert [r["threads"] for r in result["rows"]] == [1, 2]
    assert all(r["step_ms"] >= r["accept_ms"] > 0 and r["us_per_row"] > 0 for r in result["rows"])
    assert json.loads(out.read_text())["rows"] == result["rows"]
