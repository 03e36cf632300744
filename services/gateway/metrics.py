"""The gateway's Prometheus metrics (served at /metrics).

Each app gets its own registry, so several gateways in one process (tests) do not collide.
KV bytes and recomputed tokens are counted per request from the decode worker's final stats:
a "disaggregated" deployment that silently recomputes every prompt shows up here.

With several gateway processes on one port (`splitserve gateway --processes N`) every process
writes its values under PROMETHEUS_MULTIPROC_DIR and /metrics, whichever process answers, adds
them up (prometheus_client's multiprocess mode). Per-process gauges are summed over live processes.
Gauges that copy a worker's load report, or the healthy-worker count, show the most recent value
that any process wrote.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


def observe_n(histogram: Histogram, amount: float, count: int) -> None:
    """`count` observations of `amount` at the price of one: a merged chunk of 16 tokens is 16
    inter-token gaps, and 16 `observe` calls per SSE event were a fifth of the gateway's CPU per
    event at full load. Same exposition as `count` calls (tests/services/test_gateway_metrics.py)."""
    bounds, buckets, total = (getattr(histogram, name, None) for name in ("_upper_bounds", "_buckets", "_sum"))
    if bounds is None or buckets is None or total is None:  # a prometheus_client without these internals
        for _ in range(count):
            histogram.observe(amount)
        return
    total.inc(amount * count)
    for bucket, bound in zip(buckets, bounds):
        if amount <= bound:
            bucket.inc(count)
            return


class GatewayMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        summed, latest = ({"multiprocess_mode": "livesum"}, {"multiprocess_mode": "livemostrecent"}) \
            if self.multiprocess else ({}, {})
        self.requests = Counter("splitserve_gateway_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.ttft_s = Histogram("splitserve_gateway_time_to_first_token_seconds",
                                "Arrival to first generated token, per choice", buckets=_LATENCY_BUCKETS_S, registry=r)
        self.itl_s = Histogram("splitserve_gateway_inter_token_latency_seconds",
                               "Time between consecutive token arrivals (per token)", buckets=_ITL_BUCKETS_S, registry=r)
        self.e2e_s = Histogram("splitserve_gateway_e2e_request_latency_seconds",
                               "Arrival to last token, per HTTP request", buckets=_LATENCY_BUCKETS_S, registry=r)
        self.prompt_tokens = Counter("splitserve_gateway_prompt_tokens", "Prompt tokens of served choices", registry=r)
        self.generation_tokens = Counter("splitserve_gateway_generation_tokens", "Generated tokens", registry=r)
        self.cached_tokens = Counter("splitserve_gateway_cached_prompt_tokens",
                                     "Prompt tokens not computed by the serving worker (prefix cache or KV transfer)",
                                     registry=r)
        self.kv_bytes = Counter("splitserve_gateway_kv_transfer_bytes", "KV bytes moved prefill -> decode", registry=r)
        self.recomputed_tokens = Counter("splitserve_gateway_recomputed_tokens",
                                         "Tokens a worker computed again (preemption or failed KV transfer)", registry=r)
        self.routes = Counter("splitserve_gateway_routes", "Routing decisions by reason (load, prefix-affinity, "
                              "session, session-on-decode, session-overloaded, session-moved)", ["reason"],
                              registry=r)
        self.worker_failures = Counter("splitserve_gateway_worker_failures", "Failed worker RPCs",
                                       ["role", "method"], registry=r)
        self.inflight = Gauge("splitserve_gateway_inflight_requests", "Requests generating now", registry=r, **summed)
        self.queued = Gauge("splitserve_gateway_queued_requests", "Requests waiting for admission", registry=r,
                            **summed)
        self.healthy_workers = Gauge("splitserve_gateway_healthy_workers", "Healthy workers by role", ["role"],
                                     registry=r, **latest)
        # Each worker's last GetLoad report, so one Prometheus job on the gateway sees the whole fleet.
        labels = ["instance", "role"]
        self.worker_running = Gauge("splitserve_worker_running_requests", "Requests running", labels, registry=r, **latest)
        self.worker_waiting = Gauge("splitserve_worker_waiting_requests", "Requests waiting (or loading KV)",
                                    labels, registry=r, **latest)
        self.worker_kv_usage = Gauge("splitserve_worker_kv_usage", "Fraction of KV blocks in use", labels, registry=r, **latest)
        self.worker_free_blocks = Gauge("splitserve_worker_free_kv_blocks", "Free KV blocks", labels, registry=r, **latest)
        self.worker_prefix_hit_rate = Gauge("splitserve_worker_prefix_hit_rate",
                                            "Prompt tokens served from the prefix cache / prompt tokens", labels,
                                            registry=r, **latest)
        self.worker_counter = Gauge("splitserve_worker_counter", "A worker's monotonic totals (preemptions, KV "
                                    "transfers, bytes)", [*labels, "name"], registry=r, **latest)

    def observe_worker(self, name: str, load) -> None:
        """Record one worker's `WorkerLoad` report under its name (role-index, not its address)."""
        labels = (name, load.role)
        self.worker_running.labels(*labels).set(load.num_running)
        self.worker_waiting.labels(*labels).set(load.num_waiting)
        self.worker_kv_usage.labels(*labels).set(load.kv_usage)
        self.worker_free_blocks.labels(*labels).set(load.num_free_blocks)
        self.worker_prefix_hit_rate.labels(*labels).set(load.prefix_hit_rate)
        for name, value in load.counters.items():
            self.worker_counter.labels(*labels, name).set(value)

    def render(self) -> bytes:
        if not self.multiprocess:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
