"""The fill scaling benchmark runs on a CPU at a tiny size: every way (xgrammar's pool, the engine's
pool filling and stepping, per row) writes the same bitmask and draws the same tokens on fresh
states (the benchmark asserts both), and each way's time is reported per thread count."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "loadtests"))

import bench_fill_scaling  # noqa: E402


def test_tiny_run_reports_every_way_per_thread_count() -> None:
    result = bench_fill_scaling.main(["--vocab-size", "1024", "--rows", "10", "--threads", "1,3", "--output-len", "3",
                                      "--advance", "4", "--repeats", "2"])
    assert [r["threads"] for r in result["rows"]] == [1, 3]
    ways = ("pool", "slices", "fresh_accept", "fresh_pool", "fresh_slices", "fresh_accept_slices", "fresh_own_step")
    assert all(r[f"{way}_ms"] > 0 for r in result["rows"] for way in ways)
    assert all(r["fresh_own_step_ms"] >= r["fresh_accept_slices_ms"] for r in result["rows"])
