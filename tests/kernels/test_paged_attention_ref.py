"""`paged_attention_ref` against an independent dense-attention oracle (float64, token-by-token gather)."""

from __future__ import annotations

import pytest
import torch

from paged_batch import dense_attention, make_paged_batch
from splitserve.kernels.paged_attention import paged_attention_ref

# (query_lens, seq_lens): decode rows (q_len 1), prefill chunks (q_len < seq_len), full prefills.
MIXED = ([1, 7, 19, 1, 5], [37, 23, 19, 1, 5])


@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(4, 2), (2, 2), (4, 1)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_mixed_batch_matches_dense(num_q_heads, num_kv_heads, head_dim):
    batch = make_paged_batch(*MIXED, num_q_heads, num_kv_heads, head_dim, seed=head_dim + num_q_heads)
    out = paged_attention_ref(*batch.args())
    assert out.dtype == batch.q.dtype and out.shape == batch.q.shape
    torch.testing.assert_close(out.double(), dense_attention(batch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sliding_window", [1, 4, 16])
def test_sliding_window_matches_dense(sliding_window):
    batch = make_paged_batch([1, 9, 12], [40, 30, 12], 4, 2, 64, block_size=8, seed=sliding_window)
    out = paged_attention_ref(*batch.args(), sliding_window)
    torch.testing.assert_close(out.double(), dense_attention(batch, sliding_window), atol=1e-5, rtol=1e-5)


def test_window_of_one_returns_own_value():
    # With window 1 each token sees only itself, so the output is its own V row.
    batch = make_paged_batch([3], [3], 2, 2, 64, seed=3)
    out = paged_attention_ref(*batch.args(), 1)
    table = batch.block_tables[0].tolist()
    expected = batch.v_cache[table[0], :3]
    torch.testing.assert_close(out, expected)


def test_reads_only_its_layer_of_the_pool():
    batch = make_paged_batch(*MIXED, 4, 2, 64, seed=5)
    before = paged_attention_ref(*batch.args())
    batch.kv_cache[:, 0] = float("nan")  # the other layer
    torch.testing.assert_close(paged_attention_ref(*batch.args()), before)


def test_bf16_output_dtype_and_accuracy():
    batch = make_paged_batch(*MIXED, 4, 2, 64, dtype=torch.bfloat16, seed=9)
    out = paged_attention_ref(*batch.args())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), dense_attention(batch), atol=2e-2, rtol=2e-2)


def test_query_longer_than_context_is_rejected():
    batch = make_paged_batch([4], [4], 2, 2, 64)
    batch.seq_lens[0] = 3
    with pytest.raises(ValueError, match="query length 4"):
        paged_attention_ref(*batch.args())
