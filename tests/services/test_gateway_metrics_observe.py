"""`observe_n`: k observations of one value at once expose exactly what k `observe` calls do,
in one process and in prometheus_client's multiprocess mode (several gateway processes)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from splitserve.services.gateway.metrics import observe_n

BUCKETS = (0.001, 0.01, 0.1, 1.0)


def _exposition(record) -> bytes:
    registry = CollectorRegistry()
    histogram = Histogram("itl_seconds", "gaps", buckets=BUCKETS, registry=registry)
    record(histogram)
    # the `_created` timestamp differs between any two histograms; everything else must match
    return b"\n".join(line for line in generate_latest(registry).splitlines() if b"_created" not in line)


def test_observe_n_exposes_what_repeated_observe_exposes() -> None:
    samples = [(0.0005, 3), (0.02, 16), (0.02, 1), (5.0, 2), (0.1, 7), (0.3, 0)]

    def one_by_one(h):
        for value, count in samples:
            for _ in range(count):
                h.observe(value)

    def at_once(h):
        for value, count in samples:
            observe_n(h, value, count)

    exact, looped = _split_sum(_exposition(at_once)), _split_sum(_exposition(one_by_one))
    assert exact[0] == looped[0]  # every bucket and the count
    assert abs(exact[1] - looped[1]) < 1e-9  # the sum, up to float rounding of repeated additions
    assert b'itl_seconds_count 29.0' in exact[0]


def _split_sum(text: bytes) -> tuple[bytes, float]:
    lines = text.splitlines()
    total = next(float(line.split()[1]) for line in lines if line.startswith(b"itl_seconds_sum"))
    return b"\n".join(line for line in lines if not line.startswith(b"itl_seconds_sum")), total


def test_observe_n_in_multiprocess_mode(tmp_path) -> None:
    script = textwrap.dedent(f"""
        import os, sys
        from prometheus_client import CollectorRegistry, Histogram, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector
        from splitserve.services.gateway.metrics import observe_n
        h = Histogram("itl_seconds", "gaps", buckets={BUCKETS!r})
        if sys.argv[1] == "n":
            observe_n(h, 0.02, 16); observe_n(h, 0.5, 3)
        else:
            for _ in range(16): h.observe(0.02)
            for _ in range(3): h.observe(0.5)
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        sys.stdout.write(generate_latest(registry).decode())
    """)
    outputs = []
    for mode in ("n", "loop"):
        directory = tmp_path / mode
        directory.mkdir()
        env = {"PROMETHEUS_MULTIPROC_DIR": str(directory), "PATH": "/usr/bin:/bin"}
        outputs.append(subprocess.run([sys.executable, "-c", script, mode], env=env, capture_output=True, text=True,
                                      check=True, timeout=60).stdout)
    exact, looped = (_split_sum(o.encode()) for o in outputs)
    assert exact[0] == looped[0] and abs(exact[1] - looped[1]) < 1e-9 and b"itl_seconds_count 19.0" in exact[0]
