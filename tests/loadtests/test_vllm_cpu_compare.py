"""loadtests/vllm_cpu_compare.py's server command lines (the run itself needs vLLM's own venv):
a `splitserve:FLAGS` system is splitserve with those `up` flags, so settings A/B in one run."""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "loadtests"))

import vllm_cpu_compare  # noqa: E402

ARGS = argparse.Namespace(model="/m", max_model_len=1024, vllm_venv="/v", vllm_serve_args=["--x", "1"])


def test_a_splitserve_variant_appends_its_flags_to_the_plain_command():
    plain = vllm_cpu_compare.server_argv("splitserve", ARGS, 9000)
    variant = vllm_cpu_compare.server_argv("splitserve:--cpu-threads=2,--max-num-seqs=8", ARGS, 9000)
    assert plain[:5] == [sys.executable, "-m", "splitserve.cli", "up", "--colocated"]
    assert variant == [*plain, "--cpu-threads=2", "--max-num-seqs=8"]


def test_the_flags_a_variant_names_are_flags_up_accepts():
    from splitserve.cli import build_parser

    argv = vllm_cpu_compare.server_argv("splitserve:--cpu-threads=2", ARGS, 9000)
    assert build_parser().parse_args(argv[3:]).cpu_threads == 2


def test_vllm_runs_from_its_own_venv_with_the_extra_serve_args():
    argv = vllm_cpu_compare.server_argv("vllm", ARGS, 9000)
    assert argv[:3] == ["/v/bin/vllm", "serve", "/m"] and argv[-2:] == ["--x", "1"]
