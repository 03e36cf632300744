"""The engine-alone vs served comparison, run for real on CPU (demo checkpoint, tiny workload): one
round of the engine alone and the colocated stack (the disaggregated stack runs through the same
`serve_compare.run_topology`, tested in test_serve_compare.py), every request served, the table
printed with the served run's share of the engine, and the CPU of the processes sampled by role
with the bottleneck named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

sys.path.insert(0, str(REPO_ROOT / "loadtests"))
from demo_cache import seed_demo  # noqa: E402
from engine_vs_served import bottleneck, process_role  # noqa: E402


@pytest.mark.slow
def test_engine_alone_and_the_colocated_stack_on_cpu(tmp_path):
    seed_demo(str(tmp_path / "cache"))  # the script's engine-alone child serves the demo from <out-dir>/cache
    out = subprocess.run(
        [sys.executable, str(REPO_ROOT / "loadtests" / "engine_vs_served.py"), "--model", "demo", "--device", "cpu",
         "--rounds", "1", "--topologies", "colocated", "--num-prompts", "6", "--input-len", "24", "--output-len", "6", "--max-num-seqs", "8",
         "--max-num-batched-tokens", "256", "--ucx-tls", "tcp", "--cpu-interval-s", "0.2", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=400,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "engine_vs_served.json").read_text())
    assert [(r["round"], r["system"]) for r in report["results"]] == [(1, "engine alone"), (1, "colocated")]
    for r in report["results"]:
        assert r["output_throughput"] > 0
        if r["summary"]:
            assert (r["summary"]["completed"], r["summary"]["failed"]) == (6, 0)
    roles = {phase: {row[0] for row in rows} for phase, rows in report["cpu"].items()}
    assert "engine alone" in roles["round 1 engine alone"]
    # The serving process relays 36 tokens here: it may stay under the sampler's busy mark (10 ms
    # of CPU in a 0.2 s sample) on a loaded machine; the gateway and the engine process do not.
    assert {"gateway", "worker engine process"} <= roles["round 1 colocated"]
    assert roles["round 1 colocated"] <= {"gateway", "worker serving", "worker engine process", "bench client", "launcher"}
    assert "of engine" in out.stdout and out.stdout.count("->") >= 2


def test_roles_and_the_bottleneck_line():
    spawned = "python -c from multiprocessing.spawn import spawn_main; spawn_main(tracker_fd=3)"
    commands = {10: "python -m splitserve.cli worker --host 127.0.0.1 --port 5 ", 11: spawned,
                20: "python -m splitserve.cli decode --host 127.0.0.1 --port 6 ", 21: spawned,
                30: "python -c from multiprocessing.resource_tracker import main;main(12)"}
    parents = {11: 10, 21: 20, 30: 20}
    assert process_role(11, commands[11], commands, parents) == "worker engine process"
    assert process_role(21, commands[21], commands, parents) == "decode engine process"
    assert process_role(10, commands[10], commands, parents) == "worker serving"
    assert process_role(20, commands[20], commands, parents) == "decode serving"
    assert process_role(30, commands[30], commands, parents) is None
    assert "next bottleneck" in bottleneck([("gateway", 1, 1.0, 0.97, 1.0), ("worker engine process", 2, 0.5, 0.4, 0.6)])
    assert "gateway" in bottleneck([("gateway", 1, 1.0, 0.97, 1.0)])
    assert "no thread is saturated" in bottleneck([("worker engine process", 2, 0.5, 0.4, 0.6)])
