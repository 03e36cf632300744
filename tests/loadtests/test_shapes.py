"""The benchmark shapes build our model (on the meta device: no memory) with exactly the parameters
the roofline counts, and the MoE counts are the published ones."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "loadtests"))

from shapes import SHAPES, expected_experts_touched, param_count, write_shape  # noqa: E402


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_param_count_matches_the_built_model(shape, tmp_path):
    from splitserve.shared.model.loader import load_hf_config
    from splitserve.shared.model.registry import resolve_architecture

    cfg = load_hf_config(write_shape(shape, str(tmp_path)))
    with torch.device("meta"):
        model = resolve_architecture(cfg)(cfg)
    built = sum(p.numel() for p in model.parameters())
    assert built == param_count(shape)


def test_moe_active_parameters_and_touched_experts():
    assert 30.0e9 < param_count("qwen3-30b-a3b") < 31.0e9  # "30.5B total, 3.3B activated"
    assert 3.2e9 < param_count("qwen3-30b-a3b", active_experts=8) < 3.4e9
    assert 46.0e9 < param_count("mixtral-8x7b") < 47.5e9 and 12.5e9 < param_count("mixtral-8x7b", active_experts=2) < 13.2e9
    assert 14.0e9 < param_count("qwen1.5-moe-a2.7b") < 14.6e9 and 2.6e9 < param_count("qwen1.5-moe-a2.7b", active_experts=4) < 2.8e9
    assert expected_experts_touched("qwen3-30b-a3b", 1) == pytest.approx(8)
    assert expected_experts_touched("qwen3-30b-a3b", 64) > 120  # nearly every expert at batch 64
