"""Paged attention over the block-major KV cache: varlen prefill chunks and decode in one call.

`paged_attention_ref` is the plain-torch oracle and CPU path; the Triton kernel and its wrapper
`paged_attention` follow it.

Layout. `k_cache`/`v_cache` are `[num_blocks, block_size, num_kv_heads, head_dim]` strided views of
the pool `kv_cache[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]`, so they are not
contiguous across blocks. Request `b` owns query rows `query_start_loc[b]:query_start_loc[b+1]` of
`q`; its keys are the first `seq_lens[b]` slots named by `block_tables[b]`. Query token `i` sits at
position `p = seq_lens[b] - q_len_b + i` and sees key positions `j <= p` (and `p - j < sliding_window`
when given). Query head `h` reads kv head `h // (Hq // Hkv)`.
"""

from __future__ import annotations

import torch

from splitserve.kernels.triton_import import require_triton, tl, triton


def _check_ragged_lengths(query_lens: list[int], seq_lens: list[int]) -> None:
    for b, (q_len, seq_len) in enumerate(zip(query_lens, seq_lens)):
        if q_len < 0 or q_len > seq_len:
            raise ValueError(f"request {b}: query length {q_len} must be in [0, seq_len={seq_len}]")


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    *,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """Plain-torch paged attention, one request at a time, softmax in fp32. Returns `[T, Hq, D]`."""
    del max_query_len, max_seq_len  # host hints for the kernel's launch; the loop needs none
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    query_lens = [starts[b + 1] - starts[b] for b in range(len(lens))]
    _check_ragged_lengths(query_lens, lens)
    out = torch.empty_like(q)
    for b, (q_len, seq_len) in enumerate(zip(query_lens, lens)):
        if q_len == 0:
            continue
        num_blocks = -(-seq_len // block_size)
        block_ids = block_tables[b, :num_blocks].to(device=k_cache.device, dtype=torch.long)
        # [num_blocks, block_size, Hkv, D] -> [seq_len, Hkv, D] -> [Hq, seq_len, D]
        k = k_cache[block_ids].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        v = v_cache[block_ids].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        k = k.transpose(0, 1).repeat_interleave(group, dim=0)
        v = v.transpose(0, 1).repeat_interleave(group, dim=0)
        q_b = q[starts[b] : starts[b + 1]].float().transpose(0, 1)  # [Hq, q_len, D]
        scores = torch.matmul(q_b, k.transpose(1, 2)) * scale  # [Hq, q_len, seq_len]
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
        k_pos = torch.arange(seq_len, device=q.device)[None, :]
        visible = k_pos <= q_pos
        if sliding_window is not None:
            visible &= (q_pos - k_pos) < sliding_window
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[starts[b] : starts[b + 1]] = torch.matmul(probs, v).transpose(0, 1).to(q.dtype)
    return out


def paged_attention(*args, **kwargs):  # Triton wrapper: in progress
    raise NotImplementedError("Triton paged_attention is not written yet; use paged_attention_ref")
