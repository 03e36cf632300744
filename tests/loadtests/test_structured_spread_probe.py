"""The structured spread probe runs both probes on a CPU at a tiny size and leaves the process as
it found it (switch interval, the pool's handshake, the collector)."""

from __future__ import annotations

import gc
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "loadtests"))

import structured_spread_probe as probe  # noqa: E402


@pytest.mark.parametrize("which,variants", [("switch", probe.SWITCH_VARIANTS), ("gc", probe.GC_VARIANTS)])
def test_tiny_probe_runs_every_variant_and_restores_the_process(which, variants) -> None:
    from splitserve.shared import grammar_fill

    wait = grammar_fill._wait
    results = probe.main(["--probe", which, "--rounds", "1", "--shape", "tiny", "--device", "cpu", "--num-prompts",
                          "3", "--input-len", "8", "--output-len", "6"])
    assert list(results) == [v[0] for v in variants]
    assert all(len(rows) == 1 and rows[0]["output_tok_s"] > 0 for rows in results.values())
    assert grammar_fill._wait is wait and sys.getswitchinterval() == 0.005 and gc.isenabled()
    assert not any(getattr(c, "__self__", None).__class__ is probe.GcTimer for c in gc.callbacks)
