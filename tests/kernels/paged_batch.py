"""Builds ragged paged-attention batches for the kernel tests (imported by the test modules)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PagedBatch:
    q: torch.Tensor  # [T, Hq, D]
    kv_cache: torch.Tensor  # [num_blocks, num_layers, 2, block_size, Hkv, D], the whole pool
    layer: int
    query_start_loc: torch.Tensor  # [B+1] int32
    seq_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    query_lens: list[int]
    scale: float

    @property
    def k_cache(self) -> torch.Tensor:
        return self.kv_cache[:, self.layer, 0]

    @property
    def v_cache(self) -> torch.Tensor:
        return self.kv_cache[:, self.layer, 1]

    def args(self) -> tuple:
        return (self.q, self.k_cache, self.v_cache, self.query_start_loc, self.seq_lens, self.block_tables, self.scale)


def make_paged_batch(
    query_lens: list[int],
    seq_lens: list[int],
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int = 16,
    num_layers: int = 2,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    strided_q: bool = False,
) -> PagedBatch:
    """Random batch over a block-major pool whose block ids are shuffled and interleaved across
    requests (never contiguous); spare blocks hold garbage that a correct kernel never reads."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_req = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_req) + 3
    kv_cache = torch.randn(num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    ids = torch.randperm(num_blocks, generator=gen)[: sum(blocks_per_req)]
    max_blocks = max(blocks_per_req) + 1  # one column of padding beyond the longest request
    block_tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    for b, n in enumerate(blocks_per_req):
        block_tables[b, :n] = ids[sum(blocks_per_req[:b]) : sum(blocks_per_req[: b + 1])]
    num_tokens = sum(query_lens)
    if strided_q:  # q as a view into a wider [T, Hq + 2*Hkv, D] qkv buffer
        qkv = torch.randn(num_tokens, num_q_heads + 2 * num_kv_heads, head_dim, generator=gen).to(dtype)
        q = qkv[:, :num_q_heads]
    else:
        q = torch.randn(num_tokens, num_q_heads, head_dim, generator=gen).to(dtype)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    return PagedBatch(
        q=q,
        kv_cache=kv_cache,
        layer=num_layers - 1,
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=block_tables,
        query_lens=list(query_lens),
        scale=head_dim**-0.5,
    )


def dense_attention(batch: PagedBatch, sliding_window: int | None = None,
                    logit_softcap: float | None = None) -> torch.Tensor:
    """Independent oracle in float64: walk each request's block table token by token to rebuild its
    dense K/V, then a masked softmax per head. Returns `[T, Hq, D]` float64."""
    q = batch.q.double()
    num_q_heads = q.shape[1]
    block_size, num_kv_heads = batch.k_cache.shape[1], batch.k_cache.shape[2]
    out = torch.empty_like(q)
    starts = batch.query_start_loc.tolist()
    for b, seq_len in enumerate(batch.seq_lens.tolist()):
        table = batch.block_tables[b].tolist()
        k = torch.stack([batch.kv_cache[table[j // block_size], batch.layer, 0, j % block_size] for j in range(seq_len)])
        v = torch.stack([batch.kv_cache[table[j // block_size], batch.layer, 1, j % block_size] for j in range(seq_len)])
        q_len = starts[b + 1] - starts[b]
        for i in range(q_len):
            pos = seq_len - q_len + i
            keys = [j for j in range(seq_len) if j <= pos and (sliding_window is None or pos - j < sliding_window)]
            for h in range(num_q_heads):
                kv_h = h * num_kv_heads // num_q_heads
                s = k[keys, kv_h].double() @ q[starts[b] + i, h] * batch.scale
                if logit_softcap is not None:
                    s = logit_softcap * torch.tanh(s / logit_softcap)
                out[starts[b] + i, h] = torch.softmax(s, 0) @ v[keys, kv_h].double()
    return out
