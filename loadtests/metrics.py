"""Serving-benchmark metrics: per-request latencies in, a summary out. Pure functions, no I/O.

Per request (all measured on the client, on raw SSE chunks):
- TTFT: send -> first chunk carrying generated text.
- ITL: each gap between consecutive text-carrying chunks (a chunk may hold several tokens).
- TPOT: (E2E - TTFT) / (output_tokens - 1), defined for requests with >= 2 output tokens.
- E2E: send -> end of stream.

Summary: mean / median / std / chosen percentiles of each (in ms), request, output-token and
total-token throughput, and goodput: the rate of requests that met every SLO given.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

SLO_METRICS = ("ttft", "tpot", "e2el")
DEFAULT_PERCENTILES = (50.0, 90.0, 99.0)
MAX_ERRORS_KEPT = 5


@dataclass
class RequestResult:
    """What one request measured. Latencies in seconds."""

    success: bool = False
    prompt_len: int = 0  # tokens: the server's usage.prompt_tokens if given, else the workload's
    output_tokens: int = 0  # the server's usage.completion_tokens if given, else the chunk count
    ttft_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float = 0.0
    start_s: float = 0.0  # send time relative to the benchmark start
    error: str = ""

    @property
    def tpot_s(self) -> float | None:
        if not self.success or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass(frozen=True)
class LatencyStats:
    """One latency metric over the successful requests, in milliseconds."""

    mean_ms: float
    median_ms: float
    std_ms: float
    percentiles_ms: dict[str, float]  # "p90" -> value


@dataclass
class BenchmarkSummary:
    """A benchmark run's aggregate numbers."""

    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float  # completed requests / s
    output_throughput: float  # output tokens / s
    total_token_throughput: float  # (input + output) tokens / s
    goodput: float | None  # requests meeting all SLOs / s; None without SLOs
    ttft: LatencyStats
    tpot: LatencyStats
    itl: LatencyStats
    first_gap: LatencyStats  # first token -> second: disaggregated, the prefill-to-decode hand-off
    e2el: LatencyStats
    errors: list[str]  # the first few error messages

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile (0..100) by linear interpolation between closest ranks; 0.0 if empty."""
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {p}")
    if not values:
        return 0.0
    return float(np.percentile(np.asarray(values, dtype=np.float64), p))


def _percentile_key(p: float) -> str:
    return f"p{p:g}"


def latency_stats(values_s: list[float], percentiles: tuple[float, ...] = DEFAULT_PERCENTILES) -> LatencyStats:
    """Mean, median, population std and percentiles of `values_s`, converted to ms."""
    values_ms = [v * 1000.0 for v in values_s]
    if not values_ms:
        return LatencyStats(0.0, 0.0, 0.0, {_percentile_key(p): 0.0 for p in percentiles})
    array = np.asarray(values_ms, dtype=np.float64)
    return LatencyStats(
        mean_ms=float(array.mean()),
        median_ms=float(np.median(array)),
        std_ms=float(array.std()),
        percentiles_ms={_percentile_key(p): percentile(values_ms, p) for p in percentiles},
    )


def parse_slos(specs: list[str]) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for spec in specs:
        name, sep, value = spec.partition(":")
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"bad goodput SLO {spec!r}: expected NAME:MS with NAME in {SLO_METRICS}")
        try:
            slos[name] = float(value)
        except ValueError:
            raise ValueError(f"bad goodput SLO {spec!r}: {value!r} is not a number of ms") from None
        if slos[name] <= 0:
            raise ValueError(f"bad goodput SLO {spec!r}: the limit must be > 0 ms")
    return slos


def meets_slos(result: RequestResult, slos_ms: dict[str, float]) -> bool:
    """True if a successful request is within every SLO (TPOT counts as 0 for one-token outputs)."""
    if not result.success:
        return False
    measured_ms = {
        "ttft": result.ttft_s * 1000.0,
        "tpot": (result.tpot_s or 0.0) * 1000.0,
        "e2el": result.e2e_s * 1000.0,
    }
    return all(measured_ms[name] <= limit for name, limit in slos_ms.items())


def aggregate(
    results: list[RequestResult],
    duration_s: float,
    slos_ms: dict[str, float] | None = None,
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES,
) -> BenchmarkSummary:
    """Summarize a run that took `duration_s` wall seconds."""
    if duration_s <= 0:
        raise ValueError(f"duration must be > 0 s, got {duration_s}")
    ok = [r for r in results if r.success]
    input_tokens = sum(r.prompt_len for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    goodput = None
    if slos_ms:
        goodput = sum(meets_slos(r, slos_ms) for r in ok) / duration_s
    return BenchmarkSummary(
        completed=len(ok),
        failed=len(results) - len(ok),
        duration_s=duration_s,
        total_input_tokens=input_tokens,
        total_output_tokens=output_tokens,
        request_throughput=len(ok) / duration_s,
        output_throughput=output_tokens / duration_s,
        total_token_throughput=(input_tokens + output_tokens) / duration_s,
        goodput=goodput,
        ttft=latency_stats([r.ttft_s for r in ok], percentiles),
        tpot=latency_stats([t for r in ok if (t := r.tpot_s) is not None], percentiles),
        itl=latency_stats([gap for r in ok for gap in r.itl_s], percentiles),
        first_gap=latency_stats([r.itl_s[0] for r in ok if r.itl_s], percentiles),
        e2el=latency_stats([r.e2e_s for r in ok], percentiles),
        errors=[r.error for r in results if not r.success][:MAX_ERRORS_KEPT],
    )
