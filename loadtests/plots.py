"""PNG plots of serving-benchmark results (matplotlib, Agg backend: no display needed).

- `plot_latency_cdfs`: one panel per latency metric (TTFT, TPOT, ITL, E2E), the empirical CDF
  of each run (one line per request rate).
- `plot_rate_sweep`: throughput and p99 TTFT against the offered request rate.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

LATENCY_PANELS = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2el_ms", "E2E latency"))


def rate_label(request_rate: float) -> str:
    return "inf req/s" if math.isinf(request_rate) else f"{request_rate:g} req/s"


def plot_latency_cdfs(runs: list[tuple[float, dict[str, list[float]]]], path: Path) -> Path:
    """`runs`: (request_rate, {"ttft_ms": [...], "tpot_ms": [...], ...}) per run. Writes `path`."""
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, title) in zip(axes.flat, LATENCY_PANELS):
        for request_rate, latencies_ms in runs:
            values = np.sort(np.asarray(latencies_ms.get(key, []), dtype=np.float64))
            if values.size == 0:
                continue
            fraction = np.arange(1, values.size + 1) / values.size
            ax.step(values, fraction, where="post", label=rate_label(request_rate))
        ax.set_title(f"{title} CDF")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests" if key != "itl_ms" else "fraction of gaps")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize="small")
    fig.tight_layout()
    return _save(fig, path)


def plot_rate_sweep(
    request_rates: list[float], output_throughputs: list[float], request_throughputs: list[float],
    p99_ttfts_ms: list[float], path: Path,
) -> Path:
    """Output-token and request throughput, and p99 TTFT, against the offered rate. Writes `path`.

    A run at an infinite rate (everything sent at once) has no x position: it is drawn as a
    dashed horizontal line instead.
    """
    fig, (ax_tput, ax_ttft) = plt.subplots(1, 2, figsize=(11, 4.5))
    ax_req = ax_tput.twinx()
    _rate_line(ax_tput, request_rates, output_throughputs, "output tokens/s", "tab:blue", "o")
    _rate_line(ax_req, request_rates, request_throughputs, "requests/s", "tab:orange", "s")
    _rate_line(ax_ttft, request_rates, p99_ttfts_ms, "p99 TTFT", "tab:red", "o")
    ax_tput.set_ylabel("output tokens/s")
    ax_req.set_ylabel("completed requests/s")
    ax_ttft.set_ylabel("p99 TTFT (ms)")
    ax_tput.set_title("Throughput vs request rate")
    ax_ttft.set_title("p99 TTFT vs request rate")
    for ax in (ax_tput, ax_ttft):
        ax.set_xlabel("offered request rate (req/s)")
        ax.grid(alpha=0.3)
    lines = ax_tput.get_lines() + ax_req.get_lines()
    ax_tput.legend(lines, [line.get_label() for line in lines], fontsize="small", loc="upper left")
    ax_ttft.legend(fontsize="small")
    fig.tight_layout()
    return _save(fig, path)


def _rate_line(ax: plt.Axes, rates: list[float], values: list[float], label: str, color: str, marker: str) -> None:
    finite = [(r, v) for r, v in zip(rates, values) if not math.isinf(r)]
    if finite:
        xs, ys = zip(*finite)
        ax.plot(xs, ys, marker=marker, color=color, label=label)
    for r, v in zip(rates, values):
        if math.isinf(r):
            ax.axhline(v, linestyle="--", color=color, alpha=0.7, label=f"{label} at inf rate")


def _save(fig: plt.Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
