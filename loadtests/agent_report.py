"""agent_bench's report: one summary per mode (JSON), the side-by-side table, the PNG.

The retained-vs-fresh probe's turns are summarized apart ("probe"): its keyed turns fill the usual
fields, its fresh prompts only the probe's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from metrics import percentile

if TYPE_CHECKING:
    from agent_bench import ModeResult, TurnResult


def summarize(result: ModeResult, block_size: int) -> dict:
    ok = [t for t in result.turns if t.error is None and t.kind != "fresh"]
    failed = sum(t.error is not None for t in result.turns)
    by_turn = {}
    for turn in sorted({t.turn for t in ok}):
        ttfts = [t.ttft_s * 1e3 for t in ok if t.turn == turn]
        by_turn[turn] = {"ttft_p50_ms": percentile(ttfts, 50), "ttft_p99_ms": percentile(ttfts, 99)}
    prompt = sum(t.prompt_tokens for t in ok)
    cached = sum(t.cached_tokens for t in ok)
    ends = {}
    for t in ok:
        ends[t.session] = max(ends.get(t.session, 0.0), t.end_s)
    tasks = [ends[k] - result.session_start_s.get(k, 0.0) for k in ends]
    later = [t.ttft_s * 1e3 for t in ok if t.turn > 0]
    later_recomputed = sum(t.prompt_tokens - t.cached_tokens for t in ok if t.turn > 0)
    worker = result.counters.get("worker") or result.counters.get("decode") or {}
    restore_gbps = (worker.get("restore_bytes", 0) / (worker["restore_us_total"] * 1e-6) / 1e9
                    if worker.get("restore_us_total") else 0.0)
    return {
        "mode": result.mode, "turns_ok": len(ok), "turns_failed": failed,
        "ttft_p50_ms": percentile([t.ttft_s * 1e3 for t in ok], 50), "ttft_p99_ms": percentile([t.ttft_s * 1e3 for t in ok], 99),
        "later_turns_ttft_p50_ms": percentile(later, 50) if later else 0.0,
        "cached_fraction": cached / prompt if prompt else 0.0, "recomputed_prompt_tokens": prompt - cached,
        "later_turns_recomputed_tokens": later_recomputed,
        "output_tok_s": sum(t.output_tokens for t in ok) / result.wall_s if result.wall_s else 0.0,
        "task_time_p50_s": percentile(tasks, 50) if tasks else 0.0, "restore_gbps": restore_gbps,
        "by_turn": by_turn, "counters": result.counters,
        "probe": probe_summary([t for t in result.turns if t.error is None], worker),
    }


def probe_summary(turns: list[TurnResult], worker: dict) -> dict | None:
    """The retained-vs-fresh probe's pairs (None in the other modes). `restored_blocks` (the
    worker's counter) must be 0: a retained turn restored from the host tier was not retained on
    the device, and its TTFT measures the restore too."""
    retained = [t for t in turns if t.kind == "retained"]
    fresh = [t for t in turns if t.kind == "fresh"]
    if not retained or not fresh:
        return None
    retained_ms = percentile([t.ttft_s * 1e3 for t in retained], 50)
    fresh_ms = percentile([t.ttft_s * 1e3 for t in fresh], 50)
    return {"pairs": len(fresh), "retained_ttft_p50_ms": retained_ms, "fresh_ttft_p50_ms": fresh_ms,
            "retained_over_fresh": retained_ms / fresh_ms if fresh_ms else 0.0,
            "new_tokens_mean": sum(t.prompt_tokens - t.cached_tokens for t in retained) / len(retained),
            "retained_cached_fraction": sum(t.cached_tokens for t in retained) / sum(t.prompt_tokens for t in retained),
            "fresh_cached_tokens": sum(t.cached_tokens for t in fresh),
            "restored_blocks": worker.get("restore_blocks", 0)}


def print_table(summaries: list[dict]) -> None:
    rows = [("TTFT p50 ms", "ttft_p50_ms", "{:.1f}"), ("TTFT p99 ms", "ttft_p99_ms", "{:.1f}"),
            ("later turns TTFT p50 ms", "later_turns_ttft_p50_ms", "{:.1f}"),
            ("cached / prompt tokens", "cached_fraction", "{:.2f}"),
            ("recomputed prompt tokens", "recomputed_prompt_tokens", "{:d}"),
            ("  of them in later turns", "later_turns_recomputed_tokens", "{:d}"),
            ("output tok/s", "output_tok_s", "{:.1f}"), ("task time p50 s", "task_time_p50_s", "{:.2f}"),
            ("host restore GB/s", "restore_gbps", "{:.2f}"), ("failed turns", "turns_failed", "{:d}")]
    probe_rows = [("retained TTFT p50 ms", "retained_ttft_p50_ms", "{:.1f}"),
                  ("fresh same-len TTFT p50", "fresh_ttft_p50_ms", "{:.1f}"),
                  ("retained / fresh TTFT", "retained_over_fresh", "{:.2f}"),
                  ("probe new tokens (mean)", "new_tokens_mean", "{:.0f}")]
    width = max(18, *(len(s["mode"]) + 2 for s in summaries))
    print("".ljust(26) + "".join(s["mode"].rjust(width) for s in summaries))
    for label, key, fmt in rows:
        print(label.ljust(26) + "".join(fmt.format(s[key]).rjust(width) for s in summaries))
    if any(s["probe"] for s in summaries):
        for label, key, fmt in probe_rows:
            print(label.ljust(26) + "".join((fmt.format(s["probe"][key]) if s["probe"] else "-").rjust(width)
                                             for s in summaries))
    turns = sorted({t for s in summaries for t in s["by_turn"]})
    for turn in turns:
        cells = [s["by_turn"].get(turn, {}).get("ttft_p50_ms") for s in summaries]
        print(f"turn {turn} TTFT p50 ms".ljust(26) + "".join(("-" if c is None else f"{c:.1f}").rjust(width) for c in cells))


def plot(summaries: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for s in summaries:
        turns = sorted(s["by_turn"])
        ax.plot(turns, [s["by_turn"][t]["ttft_p50_ms"] for t in turns], marker="o", label=s["mode"])
    ax.set_xlabel("turn")
    ax.set_ylabel("TTFT p50 (ms)")
    ax.set_title("Agent sessions: time to first token by turn")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
