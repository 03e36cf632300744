"""Scatter this step's new K/V rows into their cache slots (in place).

`slot = block_id * block_size + offset_in_block`; a negative slot marks a padding token that is
skipped. `k_cache`/`v_cache` are `[num_blocks, block_size, Hkv, D]` strided views of the pool.
"""

from __future__ import annotations

import torch

from splitserve.kernels.triton_import import require_triton, tl, triton


def write_kv_cache_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Plain-torch scatter: `k_cache[slot // bs, slot % bs] = k[t]` for every `slot >= 0`."""
    block_size = k_cache.shape[1]
    slots = slot_mapping.to(device=k_cache.device, dtype=torch.long)
    keep = slots >= 0
    slots = slots[keep]
    block_ids, offsets = slots // block_size, slots % block_size
    # Indexed assignment on the strided view writes through to the pool.
    k_cache[block_ids, offsets] = k[keep].to(k_cache.dtype)
    v_cache[block_ids, offsets] = v[keep].to(v_cache.dtype)


def write_kv_cache(*args, **kwargs):  # Triton wrapper: in progress
    raise NotImplementedError("Triton write_kv_cache is not written yet; use write_kv_cache_ref")
