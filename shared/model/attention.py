"""Attention over the paged KV cache, and the per-step metadata every attention layer reads.

The runner builds one `AttentionMetadata` per step and passes it down `model.forward`
explicitly. A layer writes this step's K/V into its cache views, then attends over the cache;
which blocks hold a request's keys is the kernels' business, read from the metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from splitserve.kernels import ops


@dataclass
class AttentionMetadata:
    """One step's batch layout (B requests, T new tokens); see docs/architecture.md."""

    query_start_loc: torch.Tensor  # [B+1] int32, prefix sums of new-token counts
    seq_lens: torch.Tensor  # [B] int32, context length after this step
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    slot_mapping: torch.Tensor  # [T] int64, cache slot of each new token (negative = skip)
    max_query_len: int
    max_seq_len: int
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    group_tables: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()
    """(block_tables, slot_mapping) of each KV layer group when the pool is split by group
    (shared/kv/layer_groups.py; group 0's are the two fields above). Empty: every layer reads
    `block_tables` and `slot_mapping` (one pool, or a fake step whose tables are all zeros)."""

    def tables_of(self, kv_group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(block_tables, slot_mapping) that the layers of `kv_group` read."""
        if not self.group_tables:
            return self.block_tables, self.slot_mapping
        return self.group_tables[kv_group]

    @classmethod
    def build(
        cls,
        query_lens: Sequence[int],
        seq_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """From host lists: request b's new tokens are positions
        `seq_lens[b] - query_lens[b] .. seq_lens[b] - 1`, stored in the blocks of `block_tables[b]`."""
        if not (len(query_lens) == len(seq_lens) == len(block_tables)):
            raise ValueError("query_lens, seq_lens and block_tables must have one entry per request")
        slots: list[int] = []
        for b, (q_len, seq_len, table) in enumerate(zip(query_lens, seq_lens, block_tables)):
            if not 0 <= q_len <= seq_len or len(table) * block_size < seq_len:
                raise ValueError(
                    f"request {b}: query_len {q_len}, seq_len {seq_len} and {len(table)} blocks "
                    f"of {block_size} tokens are inconsistent"
                )
            for pos in range(seq_len - q_len, seq_len):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
        max_blocks = max((len(t) for t in block_tables), default=0)
        padded = [list(t) + [0] * (max_blocks - len(t)) for t in block_tables]
        starts = [0]
        for q_len in query_lens:
            starts.append(starts[-1] + q_len)
        return cls(
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(list(seq_lens), dtype=torch.int32, device=device),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=device).reshape(len(padded), max_blocks),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            max_query_len=max(query_lens, default=0),
            max_seq_len=max(seq_lens, default=0),
            query_lens_cpu=list(query_lens),
            seq_lens_cpu=list(seq_lens),
        )


class Attention(nn.Module):
    """Scaled dot-product attention of the new tokens' queries over layer `layer_idx`'s cache."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        layer_idx: int,
        sliding_window: int | None = None,
        *,
        scale: float | None = None,
        logit_softcap: float | None = None,
    ) -> None:
        """`scale` defaults to `head_dim ** -0.5`; `logit_softcap` caps scores to
        `cap * tanh(score / cap)` before the softmax (Gemma 2)."""
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window
        self.scale = head_dim**-0.5 if scale is None else scale
        self.logit_softcap = logit_softcap
        # [num_blocks, block_size, Hkv, D] strided views into the pool; set by bind_kv_cache.
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.kv_group = 0
        """The KV layer group whose pool and block tables this layer uses (set by bind_kv_cache)."""

    def bind_kv_cache(self, kv_cache: torch.Tensor, index: int | None = None, kv_group: int = 0) -> None:
        """`kv_cache [num_blocks, num_layers, 2, block_size, Hkv, D]`: keep this layer's K and V
        views, at `index` (default: `layer_idx`) in the pool of layer group `kv_group`."""
        if kv_cache.dim() != 6 or kv_cache.shape[4:] != (self.num_kv_heads, self.head_dim):
            raise ValueError(
                f"kv_cache must be [num_blocks, num_layers, 2, block_size, {self.num_kv_heads}, "
                f"{self.head_dim}], got {tuple(kv_cache.shape)}"
            )
        index = self.layer_idx if index is None else index
        self.k_cache = kv_cache[:, index, 0]
        self.v_cache = kv_cache[:, index, 1]
        self.kv_group = kv_group

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: AttentionMetadata
    ) -> torch.Tensor:
        # q [T, Hq, D], k and v [T, Hkv, D] for this step's new tokens -> [T, Hq * D]
        if self.k_cache is None:
            raise RuntimeError("no KV cache bound: call model.bind_kv_cache(kv_cache) before forward")
        block_tables, slot_mapping = attn.tables_of(self.kv_group)
        ops.write_kv_cache(k, v, self.k_cache, self.v_cache, slot_mapping)
        out = ops.paged_attention(
            q,
            self.k_cache,
            self.v_cache,
            attn.query_start_loc,
            attn.seq_lens,
            block_tables,
            self.scale,
            self.sliding_window,
            logit_softcap=self.logit_softcap,
            max_query_len=attn.max_query_len,
            max_seq_len=attn.max_seq_len,
        )
        return out.reshape(out.shape[0], -1)
