"""Mixture-of-experts routing: softmax over the experts in fp32, the top k, optionally renormalised.

`route_topk_ref` is the torch oracle and CPU path (transformers' MoE blocks compute the same);
`route_topk` is one Triton launch for what torch takes three or four (softmax, topk, sum, divide),
the router's logits read once. Slots come in descending weight; among equal weights the lower
expert id comes first.
"""

from __future__ import annotations

import torch

from splitserve.kernels.triton_import import require_triton, tl, triton


def route_topk_ref(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`router_logits [T, E]` -> `(weights [T, k] fp32, ids [T, k] int64)`. The softmax takes the
    fp32 dtype itself (as transformers' MoE blocks call it): the same values as casting first."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


@triton.jit
def _pick(probs, cols, BLOCK_E: tl.constexpr):
    """The largest of each row and its lowest column; that column's prob set to -1 for the next pick."""
    best = tl.max(probs, axis=1)[:, None]
    col = tl.min(tl.where(probs == best, cols, BLOCK_E), axis=1)[:, None]
    return best, col, tl.where(cols == col, -1.0, probs)


@triton.jit
def _route_kernel(
    weights_ptr, ids_ptr, logits_ptr, num_tokens, stride_t,
    NUM_EXPERTS: tl.constexpr, BLOCK_E: tl.constexpr, TOP_K: tl.constexpr, ROWS: tl.constexpr,
    RENORMALIZE: tl.constexpr,
):
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None]
    cols = tl.arange(0, BLOCK_E)[None, :]
    row_ok = rows < num_tokens
    logits = tl.load(logits_ptr + rows * stride_t + cols, mask=row_ok & (cols < NUM_EXPERTS), other=-float("inf"))
    logits = tl.where(row_ok, logits.to(tl.float32), 0.0)  # rows past the end stay finite
    exp = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    probs = exp / tl.sum(exp, axis=1)[:, None]
    scale = tl.full([ROWS, 1], 1.0, tl.float32)
    if RENORMALIZE:  # a first pass for the k weights' sum
        total = tl.zeros([ROWS, 1], tl.float32)
        left = probs
        for _ in tl.static_range(TOP_K):
            best, col, left = _pick(left, cols, BLOCK_E)
            total += best
        scale = 1.0 / total
    for slot in tl.static_range(TOP_K):
        best, col, probs = _pick(probs, cols, BLOCK_E)
        tl.store(weights_ptr + rows * TOP_K + slot, best * scale, mask=row_ok)
        tl.store(ids_ptr + rows * TOP_K + slot, col.to(tl.int64), mask=row_ok)


def route_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton routing; same contract as `route_topk_ref`."""
    require_triton()
    num_tokens, num_experts = router_logits.shape
    if not 1 <= top_k <= num_experts or router_logits.stride(1) != 1:
        raise ValueError(f"top_k {top_k} of {num_experts} experts over logits with contiguous rows expected")
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=router_logits.device)
    if num_tokens == 0:
        return weights, ids
    block_e = triton.next_power_of_2(num_experts)
    rows = max(1, 1024 // block_e)
    _route_kernel[(triton.cdiv(num_tokens, rows),)](
        weights, ids, router_logits, num_tokens, router_logits.stride(0),
        NUM_EXPERTS=num_experts, BLOCK_E=block_e, TOP_K=top_k, ROWS=rows, RENORMALIZE=renormalize, num_warps=4,
    )
    return weights, ids
