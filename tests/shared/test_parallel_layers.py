"""How each tensor-parallel layer slices the Hugging Face tensors, rank by rank (no processes: the
rank and size are set directly; the real collectives run in test_tensor_parallel.py)."""

from __future__ import annotations

import pytest
import torch

from splitserve.shared.model import parallel_layers as pl
from splitserve.shared.parallel import state


@pytest.fixture
def as_rank(monkeypatch):
    def set_rank(rank: int, world_size: int) -> None:
        monkeypatch.setattr(state, "_state", state.ParallelState(rank, world_size))

    return set_rank


def _qkv(rank: int, n: int, heads: int, kv_heads: int, head_dim: int, hidden: int = 8):
    q = pl.even_slice(heads * head_dim, "q")
    kv = pl.kv_head_slice(kv_heads, head_dim)
    return pl.MergedColumnParallelLinear(hidden, {"q": q, "k": kv, "v": kv}, bias=False)


@pytest.mark.parametrize("heads,kv_heads,n", [(4, 1, 2), (4, 1, 4), (4, 2, 4), (12, 4, 4), (6, 2, 2)])
def test_each_rank_holds_its_q_heads_and_the_kv_heads_they_read(as_rank, heads, kv_heads, n):
    d, hidden = 2, 8
    q, k = torch.randn(heads * d, hidden), torch.randn(kv_heads * d, hidden)
    q_parts = []
    for rank in range(n):
        as_rank(rank, n)
        layer = _qkv(rank, n, heads, kv_heads, d, hidden)
        layer.load_shard("weight", "q", q)
        layer.load_shard("weight", "k", k)
        local_q, local_k, _ = layer.weight.split([heads // n * d, max(1, kv_heads // n) * d, max(1, kv_heads // n) * d])
        q_parts.append(local_q)
        # GQA: q head h reads kv head h // (heads / kv_heads); this rank's q heads all find theirs here
        first_q = rank * heads // n
        first_kv = first_q // (heads // kv_heads)
        assert torch.equal(local_k[:d], k[first_kv * d:(first_kv + 1) * d])
    assert torch.equal(torch.cat(q_parts), q)


def test_a_fused_checkpoint_matrix_is_split_before_slicing(as_rank):
    as_rank(1, 2)
    q, k, v = torch.randn(8, 4), torch.randn(4, 4), torch.randn(4, 4)
    layer = _qkv(1, 2, heads=4, kv_heads=2, head_dim=2, hidden=4)
    layer.load_shard("weight", None, torch.cat([q, k, v]))  # Phi-3's qkv_proj
    assert torch.equal(layer.weight, torch.cat([q[4:], k[2:], v[2:]]))


def test_row_parallel_slices_input_columns_and_keeps_the_bias_whole(as_rank):
    as_rank(1, 4)
    layer = pl.RowParallelLinear(8, 3, bias=True, what="x")
    weight, bias = torch.randn(3, 8), torch.randn(3)
    layer.load_shard("weight", None, weight)
    layer.load_shard("bias", None, bias)
    assert torch.equal(layer.weight, weight[:, 2:4]) and torch.equal(layer.bias, bias)


def test_the_last_vocab_shard_is_padded_with_zero_rows(as_rank):
    vocab = torch.randn(10, 3)
    as_rank(3, 4)  # ceil(10 / 4) = 3 rows a rank: rank 3 holds row 9 and two padding rows
    head = pl.ParallelLMHead(10, 3)
    head.load_shard("weight", None, vocab)
    assert torch.equal(head.weight[0], vocab[9]) and not head.weight[1:].any()


@pytest.mark.parametrize("heads,kv_heads,n,message", [
    (4, 2, 3, "4 attention heads are not divisible by tensor_parallel_size 3"),
    (6, 3, 2, "3 key/value heads and tensor_parallel_size 2 do not divide one another"),
])
def test_splits_vllm_refuses_are_refused(heads, kv_heads, n, message):
    with pytest.raises(pl.TensorParallelError, match=message):
        pl.check_head_split(heads, kv_heads, n)


def test_an_intermediate_size_that_does_not_split_is_refused(as_rank):
    as_rank(0, 2)
    with pytest.raises(pl.TensorParallelError,
                       match="intermediate size 127 is not divisible by tensor_parallel_size 2"):
        pl.even_slice(127, "the MLP's intermediate size")
