"""The fused MoE's config table: the kernel looks its shape up in the device's table (nearest token
count) and equals the reference on that config; an unknown shape or device gets the heuristic."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import needs_triton
from splitserve.kernels import fused_moe as moe_module, moe_config
from splitserve.kernels.fused_moe import fused_moe, fused_moe_ref
from splitserve.kernels.moe_config import MoeLaunchConfig, MoeTile, heuristic_config, moe_launch_config, shape_key

CPU = torch.device("cpu")
EXPERTS, TOP_K, HIDDEN, INTER = 4, 2, 48, 40
KEY = shape_key(EXPERTS, INTER, HIDDEN, TOP_K, torch.float32)
TABLE = {  # tiles unlike the heuristic's, and a different block_m per token count
    4: MoeLaunchConfig(16, MoeTile(32, 16, 2, 4, 1), MoeTile(16, 32, 0, 4, 1)),
    64: MoeLaunchConfig(32, MoeTile(16, 32, 0, 4, 1), MoeTile(64, 16, 2, 4, 1)),
}


@pytest.fixture
def table_dir(tmp_path, monkeypatch):
    """A table for the CPU "device" in a folder of its own, as tune_moe.py writes it."""
    shapes = {KEY: {str(t): c.to_json() for t, c in TABLE.items()}}
    (tmp_path / "cpu.json").write_text(json.dumps({"device": "cpu", "shapes": shapes}))
    monkeypatch.setattr(moe_config, "MOE_CONFIG_DIR", str(tmp_path))
    moe_config.clear_config_cache()
    yield tmp_path
    moe_config.clear_config_cache()


def _problem(num_tokens, hidden=HIDDEN, inter=INTER):
    gen = torch.Generator().manual_seed(num_tokens)
    x = torch.randn(num_tokens, hidden, generator=gen)
    w13 = torch.randn(EXPERTS, 2 * inter, hidden, generator=gen) * 0.2
    w2 = torch.randn(EXPERTS, hidden, inter, generator=gen) * 0.2
    weights, ids = torch.topk(torch.softmax(torch.randn(num_tokens, EXPERTS, generator=gen), -1), TOP_K, dim=-1)
    return x, w13, w2, weights, ids


def test_lookup_takes_the_nearest_token_count(table_dir):
    def lookup(num_tokens):
        return moe_launch_config(CPU, num_tokens, EXPERTS, INTER, HIDDEN, TOP_K, torch.float32)

    assert lookup(1) == lookup(4) == lookup(33) == TABLE[4]
    assert lookup(34) == lookup(64) == lookup(5000) == TABLE[64]
    assert MoeLaunchConfig.from_json(json.loads(json.dumps(TABLE[64].to_json()))) == TABLE[64]


def test_unknown_shape_or_device_gets_the_heuristic(table_dir):
    other_shape = moe_launch_config(CPU, 64, EXPERTS, INTER, HIDDEN, TOP_K, torch.bfloat16)  # no bf16 entry
    assert other_shape == heuristic_config(64 * TOP_K, EXPERTS) != TABLE[64]
    no_table = moe_launch_config(torch.device("meta"), 64, EXPERTS, INTER, HIDDEN, TOP_K, torch.float32)
    assert no_table == heuristic_config(64 * TOP_K, EXPERTS)


@needs_triton
@pytest.mark.parametrize("num_tokens", [3, 40])
def test_kernel_runs_the_table_config_and_equals_reference(table_dir, poison_outputs, num_tokens):
    poison_outputs(moe_module)
    args = _problem(num_tokens)
    out = fused_moe(*args)  # no config given: the table's
    info = moe_launch_config.cache_info()
    assert info.misses == 1 and info.currsize == 1  # fused_moe looked its shape up once ...
    expected = TABLE[4] if num_tokens < 34 else TABLE[64]
    assert moe_launch_config(CPU, num_tokens, EXPERTS, INTER, HIDDEN, TOP_K, torch.float32) == expected
    assert moe_launch_config.cache_info().hits == 1  # ... with exactly these arguments
    torch.testing.assert_close(out, fused_moe_ref(*args), atol=1e-4, rtol=1e-4)


@needs_triton
def test_kernel_on_an_unknown_shape_runs_the_heuristic_and_equals_reference(table_dir):
    args = _problem(5, hidden=32, inter=24)  # not in the table
    torch.testing.assert_close(fused_moe(*args), fused_moe_ref(*args), atol=1e-4, rtol=1e-4)
    assert moe_launch_config(CPU, 5, EXPERTS, 24, 32, TOP_K, torch.float32) == heuristic_config(5 * TOP_K, EXPERTS)


COMMITTED = sorted(f for f in os.listdir(moe_config.MOE_CONFIG_DIR) if f.endswith(".json")) if os.path.isdir(
    moe_config.MOE_CONFIG_DIR) else []


@pytest.mark.skipif(not COMMITTED, reason="no tuned table committed under kernels/moe_configs yet")
@pytest.mark.parametrize("file_name", COMMITTED)
def test_committed_tables_load_into_configs_triton_can_build(file_name):
    """A table tune_moe.py wrote on a GPU (committed by hand): every entry loads and has tiles the
    kernels accept (powers of two, row tiles of at least 16 for tl.dot)."""
    with open(os.path.join(moe_config.MOE_CONFIG_DIR, file_name)) as f:
        device = json.load(f)["device"]
    assert moe_config.table_file_name(device) == file_name  # the name the kernel looks for
    table = moe_config._device_table(device, moe_config.MOE_CONFIG_DIR)
    assert table and all(table.values())
    for by_tokens in table.values():
        for config in by_tokens.values():
            assert config.block_m >= 16 and config.block_m & (config.block_m - 1) == 0
            for tile in (config.gate_up, config.down):
                assert all(v > 0 and v & (v - 1) == 0 for v in (tile.block_n, tile.block_k, tile.num_warps))
                assert tile.block_k >= 16 and tile.num_stages >= 1 and tile.group_m >= 0
