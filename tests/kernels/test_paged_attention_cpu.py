"""`paged_attention_cpu` (decode rows batched, prefill chunks through torch's SDPA) against the
independent dense-attention oracle (float64, token-by-token gather)."""

from __future__ import annotations

import pytest
import torch

from paged_batch import dense_attention, make_paged_batch
from splitserve.kernels.paged_attention import paged_attention_ref
from splitserve.kernels.paged_attention_cpu import paged_attention_cpu

MIXED = ([1, 7, 19, 1, 5, 1], [37, 23, 19, 1, 5, 64])
DECODES = ([1] * 9, [1, 2, 15, 16, 17, 33, 64, 5, 40])


@pytest.mark.parametrize("query_lens,seq_lens", [MIXED, DECODES])
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(4, 2), (2, 2), (4, 1)])
def test_matches_dense(query_lens, seq_lens, num_q_heads, num_kv_heads):
    batch = make_paged_batch(query_lens, seq_lens, num_q_heads, num_kv_heads, 64, seed=len(query_lens) + num_q_heads)
    out = paged_attention_cpu(*batch.args())
    assert out.dtype == batch.q.dtype and out.shape == batch.q.shape
    torch.testing.assert_close(out.double(), dense_attention(batch), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, paged_attention_ref(*batch.args()), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("sliding_window", [1, 4, 16])
def test_sliding_window_matches_dense(sliding_window):
    batch = make_paged_batch([1, 9, 1, 12, 1], [40, 30, 3, 12, 17], 4, 2, 64, block_size=8, seed=sliding_window)
    out = paged_attention_cpu(*batch.args(), sliding_window)
    torch.testing.assert_close(out.double(), dense_attention(batch, sliding_window), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("query_lens,seq_lens", [MIXED, DECODES])
def test_logit_softcap_matches_dense(query_lens, seq_lens):
    batch = make_paged_batch(query_lens, seq_lens, 4, 2, 64, seed=5)
    batch.q.mul_(8.0)  # scores well past the cap, so capping changes the result
    out = paged_attention_cpu(*batch.args(), 6, logit_softcap=5.0)
    torch.testing.assert_close(out.double(), dense_attention(batch, 6, logit_softcap=5.0), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, paged_attention_cpu(*batch.args(), 6), atol=1e-3)


def test_a_decode_row_does_not_depend_on_its_batch():
    """Padding to the longest context is masked: a request's output is the same alone or batched."""
    batch = make_paged_batch(*DECODES, 4, 2, 64, seed=3)
    together = paged_attention_cpu(*batch.args())
    for b in range(len(DECODES[0])):
        alone = paged_attention_cpu(batch.q[b : b + 1], batch.k_cache, batch.v_cache,
                                    torch.tensor([0, 1], dtype=torch.int32), batch.seq_lens[b : b + 1],
                                    batch.block_tables[b : b + 1], batch.scale)
        torch.testing.assert_close(together[b : b + 1], alone, atol=1e-6, rtol=1e-5)


def test_bf16_output_dtype_and_accuracy():
    batch = make_paged_batch(*MIXED, 4, 2, 64, dtype=torch.bfloat16, seed=9)
    out = paged_attention_cpu(*batch.args())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), dense_attention(batch), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("sliding_window", [None, 32])
def test_long_prompt_chunks_match_dense(sliding_window):
    """Prefill chunks of a few hundred tokens: a whole prompt (causal) and a chunk after a cached
    prefix (causal aligned to the chunk's end), beside a decode row, GQA 4:1."""
    batch = make_paged_batch([256, 130, 1], [256, 200, 90], 8, 2, 64, block_size=16, seed=11)
    out = paged_attention_cpu(*batch.args(), sliding_window)
    torch.testing.assert_close(out.double(), dense_attention(batch, sliding_window), atol=1e-5, rtol=1e-5)


def test_a_lone_prefill_chunk_matches_dense():
    batch = make_paged_batch([48], [48], 4, 4, 64, block_size=8, seed=12)
    torch.testing.assert_close(paged_attention_cpu(*batch.args()).double(), dense_attention(batch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("query_lens,seq_lens", [([64], [64]), ([40], [72])])
def test_prefill_chunks_run_on_torchs_fused_kernel(query_lens, seq_lens):
    """Only the fused (flash) kernel is allowed here: a change that sent prefill chunks back to a
    path materialising the score matrix (3-D inputs do) raises instead of silently slowing down."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    batch = make_paged_batch(query_lens, seq_lens, 8, 2, 64, block_size=16, seed=13)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = paged_attention_cpu(*batch.args())
    torch.testing.assert_close(out.double(), dense_attention(batch), atol=1e-5, rtol=1e-5)
