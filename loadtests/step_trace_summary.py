"""Summarise `--step-trace` files: how many steps, how big, how long, and the gaps between them.

    python loadtests/step_trace_summary.py TRACE.csv [TRACE.csv ...]

A trace may hold several bursts of work (a cold pass and a timed pass; a warm-up request and the
run): the summary covers the last burst, the steps after the last idle gap of more than
`--idle-gap-s`. Decode steps are those whose every request computes one token; the rest hold
prefill chunks. `gaps` is the time between one step's end and the next one's start: the loop's
own work outside the engine (commands, outputs), or waiting for work.
"""

from __future__ import annotations

import argparse
import csv
import statistics


def read_trace(path: str) -> list[dict]:
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def last_burst(steps: list[dict], idle_gap_s: float) -> list[dict]:
    start = 0
    for i in range(1, len(steps)):
        if steps[i]["start_s"] - _end(steps[i - 1]) > idle_gap_s:
            start = i
    return steps[start:]


def _end(step: dict) -> float:
    return step["start_s"] + step["step_ms"] / 1e3


def summarize(steps: list[dict]) -> dict:
    """Counts and medians of one burst (an empty burst gives zero steps)."""
    if not steps:
        return {"steps": 0}
    decode = [s for s in steps if s["tokens"] == s["requests"] and s["requests"] > 0]
    mixed = [s for s in steps if s["tokens"] > s["requests"]]
    gaps = [(b["start_s"] - _end(a)) * 1e3 for a, b in zip(steps, steps[1:])]
    span = _end(steps[-1]) - steps[0]["start_s"]
    return {
        "steps": len(steps), "span_s": span, "busy": sum(s["step_ms"] for s in steps) / 1e3 / span if span else 1.0,
        "decode_steps": len(decode), "decode_ms_p50": _median(s["step_ms"] for s in decode),
        "decode_batch_p50": _median(s["requests"] for s in decode),
        "mixed_steps": len(mixed), "mixed_ms_p50": _median(s["step_ms"] for s in mixed),
        "gap_ms_p50": _median(gaps), "gap_ms_total": sum(gaps), "outputs": sum(s["outputs"] for s in steps),
    }


def _median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else 0.0


def format_row(name: str, s: dict) -> str:
    if not s["steps"]:
        return f"{name:28s} no steps"
    return (f"{name:28s} {s['steps']:6d} {s['span_s']:7.2f} {s['busy']:6.0%} {s['decode_steps']:7d} "
            f"{s['decode_ms_p50']:8.2f} {s['decode_batch_p50']:7.0f} {s['mixed_steps']:6d} {s['mixed_ms_p50']:8.2f} "
            f"{s['gap_ms_p50']:7.3f} {s['gap_ms_total']:8.1f}")


HEADER = (f"{'trace':28s} {'steps':>6s} {'span s':>7s} {'busy':>6s} {'decode':>7s} {'dec ms':>8s} {'batch':>7s} "
          f"{'mixed':>6s} {'mix ms':>8s} {'gap ms':>7s} {'gaps ms':>8s}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("traces", nargs="+")
    p.add_argument("--idle-gap-s", type=float, default=0.5)
    args = p.parse_args(argv)
    print(HEADER)
    for path in args.traces:
        print(format_row(path.rsplit("/", 1)[-1], summarize(last_burst(read_trace(path), args.idle_gap_s))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
