"""Fused MoE: the torch reference against a dense per-token oracle, the pair alignment (torch, and
the Triton kernel against it), and the Triton GEMMs (interpreter) against the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import needs_triton
from splitserve.kernels import fused_moe as moe_module
from splitserve.kernels import moe_align, moe_route
from splitserve.kernels.fused_moe import fused_moe, fused_moe_ref
from splitserve.kernels.moe_align import align_pairs_by_expert, align_pairs_by_expert_ref
from splitserve.kernels.moe_config import MoeLaunchConfig, MoeTile
from splitserve.kernels.moe_route import route_topk_ref


def _problem(num_tokens=9, hidden=64, inter=32, num_experts=4, top_k=2, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=gen) * 0.2).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, generator=gen) * 0.2).to(dtype)
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    weights, ids = torch.topk(torch.softmax(logits, -1), top_k, dim=-1)
    return x, w13, w2, weights, ids


def _dense_oracle(x, w13, w2, weights, ids, act):
    """Token by token, slot by slot, in float64."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    inter = w2.shape[2]
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = w13[e].double() @ x[t].double()
            gate = F.gelu(h[:inter], approximate="tanh") if act == "gelu_pytorch_tanh" else F.silu(h[:inter])
            out[t] += float(weights[t, j]) * (w2[e].double() @ (gate * h[inter:]))
    return out


@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
def test_reference_matches_dense_oracle(act):
    args = _problem(seed=1)
    torch.testing.assert_close(fused_moe_ref(*args, act).double(), _dense_oracle(*args, act), atol=1e-5, rtol=1e-5)


def test_alignment_groups_pairs_by_expert_in_padded_tiles():
    ids = torch.tensor([[2, 0], [2, 3], [0, 2], [2, 1]])
    pair_of_row, expert_of_tile = align_pairs_by_expert_ref(ids, num_experts=5, block_m=2)
    rows = pair_of_row.tolist()
    for tile, expert in enumerate(expert_of_tile.tolist()):
        pairs = [p for p in rows[2 * tile : 2 * tile + 2] if p >= 0]
        assert all(ids.view(-1)[p] == expert for p in pairs)
        assert expert >= 0 or not pairs
    assert sorted(p for p in rows if p >= 0) == list(range(8))  # every pair exactly once
    assert expert_of_tile.tolist()[:5] == [0, 1, 2, 2, 3]  # expert 4 gets no tile


@needs_triton
@pytest.mark.parametrize("num_tokens,top_k,num_experts,block_m", [(4, 2, 5, 2), (9, 2, 4, 16), (1, 1, 6, 16), (70, 3, 7, 4)])
def test_triton_alignment_equals_torch(poison_outputs, num_tokens, top_k, num_experts, block_m):
    """Every row and tile, padding and tail included, as the torch ops give them (a stable sort)."""
    poison_outputs(moe_align)
    gen = torch.Generator().manual_seed(num_tokens)
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_tokens)])
    ids[: num_tokens // 2] = ids[0]  # a crowded expert: runs of several tiles
    for got, want in zip(align_pairs_by_expert(ids, num_experts, block_m), align_pairs_by_expert_ref(ids, num_experts, block_m)):
        assert torch.equal(got, want)


@needs_triton
@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("num_tokens,top_k,group_m", [(9, 2, 0), (3, 1, 0), (20, 2, 2)])
def test_triton_matches_reference(poison_outputs, act, num_tokens, top_k, group_m):
    poison_outputs(moe_module)
    args = _problem(num_tokens=num_tokens, top_k=top_k, hidden=48, inter=40, seed=2)  # not multiples of the tiles
    # the two GEMMs on different tiles; group_m 2 swizzles the 1-D grid over several row tiles
    config = MoeLaunchConfig(16, MoeTile(block_n=32, block_k=32, group_m=group_m), MoeTile(block_n=64, block_k=16, group_m=group_m))
    out = fused_moe(*args, act, config=config)
    torch.testing.assert_close(out, fused_moe_ref(*args, act), atol=1e-4, rtol=1e-4)


@needs_triton
def test_triton_rejects_mismatched_weights():
    x, w13, w2, weights, ids = _problem()
    with pytest.raises(ValueError, match="do not fit"):
        fused_moe(x, w13, w2[:, :, :-1], weights, ids)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slot_sum_equals_torch_sum_over_slots(poison_outputs, dtype):
    """Hidden 1500: two column tiles of 1024, the second masked; bf16 summed in fp32 as torch does
    (the interpreter truncates the fp32 sum to bf16 where the GPU rounds: one bf16 step allowed)."""
    poison_outputs(moe_module)
    pair_out = torch.randn(7 * 3, 1500, generator=torch.Generator().manual_seed(5)).to(dtype)
    want = pair_out.view(7, 3, 1500).sum(dim=1)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(moe_module.sum_slots(pair_out, 3), want, atol=tol, rtol=tol)


def test_routing_reference_matches_transformers_router():
    """The reference routes as transformers' own Qwen3-MoE router does, renormalised or not."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(11, 16, generator=gen)
    for renormalize in (False, True):
        config = Qwen3MoeConfig(hidden_size=16, num_experts=9, num_experts_per_tok=3, norm_topk_prob=renormalize)
        router = Qwen3MoeTopKRouter(config)
        router.weight.data = torch.randn(9, 16, generator=gen)
        logits, want_w, want_ids = router(x)
        got_w, got_ids = route_topk_ref(logits, 3, renormalize)
        assert torch.equal(got_ids, want_ids) and torch.equal(got_w, want_w)


@needs_triton
@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(37, 128, 8), (5, 60, 4), (3, 6, 1)])
@pytest.mark.parametrize("renormalize", [False, True])
def test_triton_routing_matches_reference(poison_outputs, num_tokens, num_experts, top_k, renormalize):
    """37 tokens of 128 experts: 8 a program, the last program partly masked; 60 experts: padded
    to 64 columns that must never be picked. A tied pair picks the lower expert id first."""
    poison_outputs(moe_route)
    logits = torch.randn(num_tokens, num_experts + 3, generator=torch.Generator().manual_seed(num_experts))
    logits = logits[:, :num_experts]  # rows strided wider than the experts
    logits[0, 2] = logits[0, 1] = logits[0].max() + 1.0
    weights, ids = moe_route.route_topk(logits, top_k, renormalize)
    want_w, want_ids = route_topk_ref(logits, top_k, renormalize)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_w, atol=1e-6, rtol=1e-5)
    if top_k > 1:
        assert ids[0, :2].tolist() == [1, 2]
