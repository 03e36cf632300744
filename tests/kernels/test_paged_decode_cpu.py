"""The C decode attention (`kernels/paged_decode_cpu.c`, compiled here with the machine's C
compiler) against the float64 dense oracle and against the torch path it replaces, on caches that
are views into a block-major pool (shuffled, interleaved blocks; a block stride of several layers)."""

from __future__ import annotations

import shutil

import pytest
import torch

from paged_batch import dense_attention, make_paged_batch
from splitserve.kernels import native_cpu, paged_decode_cpu
from splitserve.kernels.paged_attention_cpu import paged_attention_cpu

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler on this machine")
SEQ_LENS = [1, 2, 15, 16, 17, 33, 64, 5, 40]


@pytest.fixture
def torch_path(monkeypatch):
    """Run the body with the native kernel switched off (the torch gather path)."""
    def run(fn):
        monkeypatch.setenv("SPLITSERVE_CPU_NATIVE", "0")
        paged_decode_cpu._library.cache_clear()
        try:
            return fn()
        finally:
            monkeypatch.delenv("SPLITSERVE_CPU_NATIVE")
            paged_decode_cpu._library.cache_clear()
    return run


def native(batch, sliding_window=None):
    lens = batch.seq_lens.tolist()
    return paged_decode_cpu.paged_decode(batch.q, batch.k_cache, batch.v_cache, batch.block_tables, lens,
                                         batch.scale, sliding_window)


def test_the_kernel_builds_and_loads():
    assert paged_decode_cpu._library() is not None


@pytest.mark.parametrize("head_dim", [32, 64, 128, 80])  # 80: the loop without a constant head_dim
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(4, 2), (2, 2), (8, 1)])
@pytest.mark.parametrize("block_size", [16, 8])
def test_matches_dense_fp32(head_dim, num_q_heads, num_kv_heads, block_size):
    batch = make_paged_batch([1] * len(SEQ_LENS), SEQ_LENS, num_q_heads, num_kv_heads, head_dim,
                             block_size=block_size, seed=head_dim + num_q_heads)
    out = native(batch)
    assert out is not None and out.dtype == torch.float32 and out.shape == batch.q.shape
    torch.testing.assert_close(out.double(), dense_attention(batch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sliding_window", [1, 4, 16, 100])
def test_sliding_window_matches_dense(sliding_window):
    batch = make_paged_batch([1] * len(SEQ_LENS), SEQ_LENS, 4, 2, 64, block_size=8, seed=sliding_window)
    out = native(batch, sliding_window)
    torch.testing.assert_close(out.double(), dense_attention(batch, sliding_window), atol=1e-5, rtol=1e-5)


def test_bf16_cache_matches_dense_and_the_torch_path(torch_path):
    batch = make_paged_batch([1] * len(SEQ_LENS), SEQ_LENS, 4, 2, 64, dtype=torch.bfloat16, seed=4)
    out = native(batch)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), dense_attention(batch), atol=2e-2, rtol=2e-2)
    torch_out = torch_path(lambda: paged_attention_cpu(*batch.args()))
    torch.testing.assert_close(out, torch_out, atol=8e-3, rtol=8e-3)  # both round fp32 math to bf16 once


def test_the_cpu_attention_uses_it_for_decode_rows_and_agrees_with_the_torch_path(torch_path, monkeypatch):
    """paged_attention_cpu sends its decode rows here (a prefill chunk in the batch stays on SDPA)."""
    batch = make_paged_batch([1, 7, 1, 1, 5, 1], [37, 23, 19, 1, 5, 64], 4, 2, 64, seed=8)
    calls = []
    real = paged_decode_cpu.paged_decode
    monkeypatch.setattr(paged_decode_cpu, "paged_decode", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    out = paged_attention_cpu(*batch.args())
    assert calls == [4]
    torch.testing.assert_close(out, torch_path(lambda: paged_attention_cpu(*batch.args())), atol=1e-6, rtol=1e-5)


@pytest.fixture(params=[4, 8, 16], ids=lambda lanes: f"lanes{lanes}")
def lanes(request, monkeypatch):
    """The kernel built with another vector width (each width has its own lane-sum code)."""
    flags = (f"-DLANES={request.param}",)
    library = native_cpu.load(native_cpu.build(paged_decode_cpu.SOURCE, flags), paged_decode_cpu.SIGNATURES)
    monkeypatch.setattr(paged_decode_cpu, "_library", lambda: library)
    return request.param


@pytest.mark.parametrize("head_dim", [32, 36, 80, 128])  # 36, 80: a scalar tail at some widths
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_vector_width_matches_dense(lanes, head_dim, dtype):
    batch = make_paged_batch([1] * len(SEQ_LENS), SEQ_LENS, 6, 2, head_dim, block_size=8, dtype=dtype,
                             seed=head_dim + lanes)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(native(batch).double(), dense_attention(batch), atol=tolerance, rtol=tolerance)


def test_head_dims_beyond_its_registers_are_left_to_the_torch_path():
    batch = make_paged_batch([1, 1], [9, 20], 2, 1, paged_decode_cpu.MAX_HEAD_DIM + 64, seed=3)
    assert native(batch) is None


def test_caches_it_does_not_take_are_left_to_the_torch_path():
    batch = make_paged_batch([1, 1], [9, 20], 4, 2, 64, dtype=torch.float16, seed=1)
    assert native(batch) is None  # fp16: not a layout the kernel reads
    wide = torch.randn(8, 16, 2, 128)[..., :64]  # head_dim values not contiguous per position
    q = torch.randn(2, 4, 64)
    tables = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    assert paged_decode_cpu.paged_decode(q, wide, wide, tables, [9, 20], 0.125, None) is None


def test_switched_off_it_returns_none(torch_path):
    batch = make_paged_batch([1], [9], 4, 2, 64, seed=2)
    assert torch_path(lambda: native(batch)) is None


def prefill(batch, sliding_window=None):
    """Every request's chunk through the C prefill, concatenated like the batch's rows."""
    starts = batch.query_start_loc.tolist()
    return torch.cat([paged_decode_cpu.paged_prefill(batch.q[starts[b]:starts[b + 1]], batch.k_cache, batch.v_cache,
                                                     batch.block_tables[b], seq_len, batch.scale, sliding_window)
                      for b, seq_len in enumerate(batch.seq_lens.tolist())])


@pytest.mark.parametrize("head_dim", [32, 36, 47, 80, 128])  # 47: a tail of 15 values at 16 lanes
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sliding_window", [None, 5])
def test_prefill_at_every_vector_width_matches_dense(lanes, head_dim, dtype, sliding_window):
    """Whole prompts and chunks over a cached history (query shorter than context), chunks not a
    multiple of any lane width, one-token chunks."""
    batch = make_paged_batch([7, 1, 20, 13, 33], [30, 9, 20, 40, 33], 6, 2, head_dim, block_size=8, dtype=dtype,
                             seed=head_dim + lanes)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(prefill(batch, sliding_window).double(), dense_attention(batch, sliding_window),
                               atol=tolerance, rtol=tolerance)


def test_the_cpu_attention_sends_small_head_dims_prefill_here(monkeypatch):
    calls = []
    real = paged_decode_cpu.paged_prefill
    monkeypatch.setattr(paged_decode_cpu, "paged_prefill", lambda *a: calls.append(a[0].shape) or real(*a))
    for head_dim in (paged_decode_cpu.PREFILL_MAX_HEAD_DIM, 64):
        batch = make_paged_batch([9, 1, 4], [9, 30, 20], 4, 2, head_dim, seed=head_dim)
        out = paged_attention_cpu(*batch.args())
        torch.testing.assert_close(out.double(), dense_attention(batch), atol=1e-5, rtol=1e-5)
    assert [shape[0] for shape in calls] == [9, 4]  # the two chunks of the small head_dim; none at 64
