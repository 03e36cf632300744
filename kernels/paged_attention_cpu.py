"""Paged attention on CPU: the same contract and math as `paged_attention_ref` (fp32 softmax)
without its per-request loop for decode or its materialised score matrix for prefill.

Decode rows (one query token each) of a batch go through one batched computation, padded to the
longest context and masked (in C where it takes them); each longer query chunk (a prefill) goes to
C for small head dims (paged_decode_cpu.py) and otherwise through torch's fused
`scaled_dot_product_attention` over its K/V gathered once. The cache layout is the one described in
`paged_attention.py`.
"""

from __future__ import annotations

import torch

from splitserve.kernels import paged_decode_cpu
from splitserve.kernels.paged_attention import check_ragged_lengths, paged_attention_ref, softcap_scores


def paged_attention_cpu(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    *,
    logit_softcap: float | None = None,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """The CPU path, same math as the reference (fp32 softmax) without its costs: every decode row
    (one query token) of the batch in one batched computation, padded to the longest context and
    masked; each longer query chunk (a prefill) through torch's fused scaled_dot_product_attention
    over its K/V gathered once, which never materialises the `[Hq, q_len, seq_len]` score matrix
    (the reference's dominant cost on a 2,048-token prompt)."""
    del max_query_len, max_seq_len
    starts = query_start_loc.tolist()
    query_lens = [starts[b + 1] - starts[b] for b in range(len(starts) - 1)]
    lens = seq_lens.tolist()
    check_ragged_lengths(query_lens, lens)
    if all(n == 1 for n in query_lens):  # a decode step: no rows to pick out and put back
        return _decode_attention(q, k_cache, v_cache, block_tables, lens, scale, sliding_window, logit_softcap)
    out = torch.empty_like(q)
    for b, q_len in enumerate(query_lens):
        if q_len > 1:
            rows = slice(starts[b], starts[b + 1])
            if logit_softcap is None:
                out[rows] = _prefill(q[rows], k_cache, v_cache, block_tables[b], lens[b], scale, sliding_window)
            else:  # torch's SDPA has no soft cap: the reference for this request
                out[rows] = paged_attention_ref(q[rows], k_cache, v_cache, torch.tensor([0, q_len]), seq_lens[b : b + 1],
                                                block_tables[b : b + 1], scale, sliding_window,
                                                logit_softcap=logit_softcap)
    decode = [b for b, n in enumerate(query_lens) if n == 1]
    if decode:
        rows = torch.tensor([starts[b] for b in decode])
        out[rows] = _decode_attention(q[rows], k_cache, v_cache, block_tables[decode], [lens[b] for b in decode],
                                      scale, sliding_window, logit_softcap)
    return out


def _prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int,
             scale: float, sliding_window: int | None) -> torch.Tensor:
    """One request's query chunk: in C (paged_decode_cpu.py) for the head dims where it is the
    faster, else through torch's fused SDPA."""
    if q.shape[-1] <= paged_decode_cpu.PREFILL_MAX_HEAD_DIM:
        native = paged_decode_cpu.paged_prefill(q, k_cache, v_cache, block_ids, seq_len, scale, sliding_window)
        if native is not None:
            return native
    return _chunk_attention(q, k_cache, v_cache, block_ids, seq_len, scale, sliding_window)


def _gather(cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """One request's first `seq_len` slots of a cache view: `[seq_len, Hkv, D]`, fp32."""
    num_blocks = -(-seq_len // cache.shape[1])
    ids = block_ids[:num_blocks].to(device=cache.device, dtype=torch.long)
    return _blocks(cache, ids).reshape(-1, cache.shape[2], cache.shape[3])[:seq_len].float()


def _blocks(cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """`cache[tables]` (`[*tables.shape, block_size, Hkv, D]`) through `index_select`, which copies
    each block as one contiguous run: 2.5-3.4x faster than advanced indexing's per-element copy on
    16 x 20 blocks of the demo model (docs/benchmarks.md section 21)."""
    return cache.index_select(0, tables.reshape(-1)).view(*tables.shape, *cache.shape[1:])


def _chunk_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor,
                     seq_len: int, scale: float, sliding_window: int | None) -> torch.Tensor:
    """One request's query chunk `q [n, Hq, D]` (its last n positions) over its whole context."""
    n, group = q.shape[0], q.shape[1] // k_cache.shape[2]
    # [1, Hq, S, D]: torch's fused CPU kernel (flash) takes only 4-D inputs, and runs faster on
    # repeated kv heads than with enable_gqa; 3-D inputs fall back to the materialising math path.
    k = _gather(k_cache, block_ids, seq_len).transpose(0, 1).repeat_interleave(group, dim=0)[None]
    v = _gather(v_cache, block_ids, seq_len).transpose(0, 1).repeat_interleave(group, dim=0)[None]
    mask = None
    if n != seq_len or sliding_window is not None:  # causal, aligned to the chunk's end
        q_pos = torch.arange(seq_len - n, seq_len)[:, None]
        k_pos = torch.arange(seq_len)[None, :]
        mask = k_pos <= q_pos
        if sliding_window is not None:
            mask &= (q_pos - k_pos) < sliding_window
    attended = torch.nn.functional.scaled_dot_product_attention(
        q.float().transpose(0, 1)[None], k, v, attn_mask=mask, is_causal=mask is None, scale=scale)  # [1, Hq, n, D]
    return attended[0].transpose(0, 1).to(q.dtype)


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                      lens: list[int], scale: float, sliding_window: int | None,
                      logit_softcap: float | None) -> torch.Tensor:
    """R decode rows `q [R, Hq, D]`, each the last position of its context, in one batch: in C
    (paged_decode_cpu.py) where it takes the rows, else by torch over a gather of their blocks."""
    if logit_softcap is None:
        native = paged_decode_cpu.paged_decode(q, k_cache, v_cache, tables, lens, scale, sliding_window)
        if native is not None:
            return native
    num_rows, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    ctx = torch.tensor(lens)  # [R]
    num_blocks = -(-int(ctx.max()) // block_size)
    tables = tables[:, :num_blocks].to(device=k_cache.device, dtype=torch.long)  # [R, nb]
    key_pos = torch.arange(num_blocks * block_size)[None, :]
    visible = key_pos < ctx[:, None]  # the query sits at position ctx - 1 and sees everything before it
    if sliding_window is not None:
        visible &= (ctx[:, None] - 1 - key_pos) < sliding_window
    if logit_softcap is None:
        return _decode_sdpa(q, k_cache, v_cache, tables, visible, scale)
    group = num_q_heads // num_kv_heads
    # Gathered straight into [R, Hkv, S, D], the layout the batched matmuls read contiguously
    # (an einsum over [R, S, Hkv, D] copied it again: ~20 % of the step's attention on CPU).
    k = _blocks(k_cache, tables).permute(0, 3, 1, 2, 4).reshape(num_rows, num_kv_heads, -1, head_dim).float()
    v = _blocks(v_cache, tables).permute(0, 3, 1, 2, 4).reshape(num_rows, num_kv_heads, -1, head_dim).float()
    q_d = q.float().view(num_rows, num_kv_heads, group, head_dim)  # [R, Hkv, G, D]
    scores = softcap_scores(torch.matmul(q_d, k.transpose(-1, -2)) * scale, logit_softcap)  # [R, Hkv, G, S]
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v).reshape(num_rows, num_q_heads, head_dim).to(q.dtype)


def _decode_sdpa(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                 visible: torch.Tensor, scale: float) -> torch.Tensor:
    """Without a soft cap: torch's fused attention over the gathered blocks as `[R, Hkv, S, D]`
    views (one copy, the gather; no permute copy, no repeated kv heads), `visible [R, S]` the
    mask. The demo model's engine step, 16 rows of ~300 tokens: 11.5 -> 9-9.8 ms (benchmarks 20)."""
    num_rows, _, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    k = _blocks(k_cache, tables).view(num_rows, -1, num_kv_heads, head_dim).transpose(1, 2).float()
    v = _blocks(v_cache, tables).view(num_rows, -1, num_kv_heads, head_dim).transpose(1, 2).float()
    attended = torch.nn.functional.scaled_dot_product_attention(
        q.float()[:, :, None, :], k, v, attn_mask=visible[:, None, None, :], scale=scale, enable_gqa=True)
    return attended[:, :, 0, :].to(q.dtype)
