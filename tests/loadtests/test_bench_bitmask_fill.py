"""The bitmask fill benchmark runs on a CPU at a tiny size: the grammar pool's masks equal the
inline fill's at every step (the benchmark asserts it) and every thread count draws the same tokens."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "loadtests"))

import bench_bitmask_fill  # noqa: E402


def test_tiny_run_reports_each_thread_count(tmp_path) -> None:
    out = tmp_path / "fill.json"
    result = bench_bitmask_fill.main(["--vocab-size", "1024", "--rows", "12", "--threads", "1,2", "--output-len", "3",
                                      "--steps", "4", "--warm", "1", "--booking-ms", "0.5", "--result-json", str(out)])
    assert [r["threads"] for r in result["rows"]] == [1, 2]
    assert all(r["loop_cost_ms"] >= r["handoff_ms"] > 0 and r["inline_ms"] > 0 for r in result["rows"])
    assert set(result["thread_start_delay"]) == {"plain_ms", "handshake_ms", "switch_interval_ms"}
    assert json.loads(out.read_text())["rows"] == result["rows"]
