"""Launch configs of the fused MoE kernels: a tuned table per device, the heuristic as the fallback.

`loadtests/tune_moe.py` sweeps the tiles on a GPU and writes `moe_configs/<device>.json` (device
name with spaces as underscores, e.g. `NVIDIA_H200.json`):

    {"device": "NVIDIA H200", "triton": "3.7.1",
     "shapes": {"experts=128,inter=768,hidden=2048,top_k=8,dtype=bfloat16":
                {"64": {"block_m": 16, "gate_up": {"block_n": 64, ...}, "down": {...}}, ...}}}

`inter` is the experts' intermediate size as the kernel sees it (per rank under tensor parallelism),
and the inner keys are token counts: a call takes the entry of the nearest one. The two GEMMs get
tiles of their own (their N and K differ: gate/up reads [2I, H] per expert, down [H, I]); they share
`block_m` because the alignment of pairs into row tiles is done once for both. A shape or device
without an entry gets `heuristic_config`. Lookups are cached per (device, shape, token count), so a
decode step pays one dict lookup.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass

import torch

MOE_CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "moe_configs")


@dataclass(frozen=True)
class MoeTile:
    """One GEMM's tiles. `group_m` row tiles share each column tile before the next column tile
    starts (the grid's swizzle: neighbouring programs reuse weight and activation tiles in L2);
    0 walks every row tile of a column first."""

    block_n: int = 64
    block_k: int = 64
    group_m: int = 0
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class MoeLaunchConfig:
    block_m: int  # rows of (token, slot) pairs per tile; each expert's run is padded to a multiple
    gate_up: MoeTile = MoeTile()
    down: MoeTile = MoeTile()

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(entry: dict) -> MoeLaunchConfig:
        return MoeLaunchConfig(entry["block_m"], MoeTile(**entry["gate_up"]), MoeTile(**entry["down"]))


def heuristic_config(num_pairs: int, num_experts: int) -> MoeLaunchConfig:
    """Row tiles sized to the tokens an expert gets on average: 16 rows in decode (few tokens per
    expert, so padding stays small), 64 in prefill (tiles reuse each weight tile for more rows)."""
    rows_per_expert = num_pairs / max(num_experts, 1)
    if rows_per_expert <= 16:
        tile = MoeTile(block_n=64, block_k=128, num_warps=4, num_stages=4)
        return MoeLaunchConfig(16, tile, tile)
    tile = MoeTile(block_n=128, block_k=64, num_warps=8, num_stages=3)
    return MoeLaunchConfig(64, tile, tile)


def shape_key(num_experts: int, inter: int, hidden: int, top_k: int, dtype: torch.dtype) -> str:
    return f"experts={num_experts},inter={inter},hidden={hidden},top_k={top_k},dtype={str(dtype).removeprefix('torch.')}"


def table_file_name(device_name: str) -> str:
    return device_name.replace(" ", "_").replace("/", "_") + ".json"


def device_name(device: torch.device) -> str:
    """The table's device name: CUDA's name for the GPU ("NVIDIA H200"), else the device type."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


@functools.lru_cache(maxsize=None)
def _device_table(device_name: str, config_dir: str) -> dict[str, dict[int, MoeLaunchConfig]]:
    """{shape key: {token count: config}}; empty when the device has no table."""
    path = os.path.join(config_dir, table_file_name(device_name))
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        shapes = json.load(f)["shapes"]
    return {key: {int(t): MoeLaunchConfig.from_json(c) for t, c in by_tokens.items()} for key, by_tokens in shapes.items()}


def tuned_config(device_name: str, key: str, num_tokens: int) -> MoeLaunchConfig | None:
    """The table's config at the token count nearest `num_tokens` (ties to the larger), or None."""
    by_tokens = _device_table(device_name, MOE_CONFIG_DIR).get(key)
    if not by_tokens:
        return None
    nearest = min(by_tokens, key=lambda t: (abs(t - num_tokens), -t))
    return by_tokens[nearest]


@functools.lru_cache(maxsize=4096)
def moe_launch_config(device: torch.device, num_tokens: int, num_experts: int, inter: int, hidden: int,
                      top_k: int, dtype: torch.dtype) -> MoeLaunchConfig:
    """The tuned config of this device and shape, else the heuristic."""
    key = shape_key(num_experts, inter, hidden, top_k, dtype)
    return tuned_config(device_name(device), key, num_tokens) or heuristic_config(num_tokens * top_k, num_experts)


def clear_config_cache() -> None:
    """Forget loaded tables (after a new table was written, or `MOE_CONFIG_DIR` changed)."""
    _device_table.cache_clear()
    moe_launch_config.cache_clear()
