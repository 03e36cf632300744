"""loadtests/kv_layer_groups.py (the GPU measurement of the layer-group KV split) in its tiny CPU
mode: more requests run at once than one pool of the same memory holds, without preemption."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "loadtests"))

import kv_layer_groups  # noqa: E402


def test_tiny_run_fits_beyond_one_pool_without_preemption():
    result = kv_layer_groups.run(kv_layer_groups.parse_args(["--tiny", "--device", "cpu"]))
    assert result["kv_group_blocks"]["full"] > result["one_pool_blocks"] > result["kv_group_blocks"]["window_8"]
    assert result["beyond_one_pool"] and result["preemptions"] == 0, result
