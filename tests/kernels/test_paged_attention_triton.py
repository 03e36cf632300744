"""Triton paged attention (interpreter) against `paged_attention_ref`: varlen, GQA, window, split-KV."""

from __future__ import annotations

import pytest
import torch

from conftest import needs_triton
from paged_batch import make_paged_batch
from splitserve.kernels import paged_attention as attention_module
from splitserve.kernels.paged_attention import paged_attention, paged_attention_ref

pytestmark = needs_triton

MIXED = ([1, 6, 20, 1], [45, 30, 20, 9])  # decode, chunk, full prefill, decode


def _check(batch, sliding_window=None, logit_softcap=None, **kwargs):
    out = paged_attention(*batch.args(), sliding_window, logit_softcap=logit_softcap, **kwargs)
    ref = paged_attention_ref(*batch.args(), sliding_window, logit_softcap=logit_softcap)
    assert not out.isnan().any(), "kernel left output elements unwritten"
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim", [(4, 2, 64), (2, 2, 32), (6, 2, 32)])
def test_mixed_varlen_batch(poison_outputs, num_splits, num_q_heads, num_kv_heads, head_dim):
    poison_outputs(attention_module)
    batch = make_paged_batch(*MIXED, num_q_heads, num_kv_heads, head_dim, seed=num_q_heads, strided_q=True)
    _check(batch, num_splits=num_splits)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_sliding_window(poison_outputs, num_splits):
    poison_outputs(attention_module)
    batch = make_paged_batch([1, 70], [150, 70], 4, 2, 32, block_size=16, seed=11)
    _check(batch, sliding_window=20, num_splits=num_splits)


def test_window_skips_blocks_before_it(poison_outputs):
    """K/V blocks wholly before every query's window are never read: NaN there leaves the output finite."""
    poison_outputs(attention_module)
    batch = make_paged_batch([1, 8], [200, 200], 4, 2, 32, block_size=16, seed=12)
    ref = paged_attention_ref(*batch.args(), 20)
    for b, first_visible in enumerate((200 - 20, 200 - 8 - 20)):
        stale = batch.block_tables[b, : (first_visible - 64) // 16].long()  # past the kernel's 64-key rounding
        assert len(stale) >= 4
        batch.kv_cache[stale] = float("nan")
    out = paged_attention(*batch.args(), 20, num_splits=1)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_logit_softcap(poison_outputs, num_splits):
    poison_outputs(attention_module)
    batch = make_paged_batch(*MIXED, 4, 2, 32, seed=13)
    batch.q.mul_(8.0)  # scores past the cap
    _check(batch, sliding_window=24, logit_softcap=5.0, num_splits=num_splits)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_tiles(poison_outputs, num_splits):
    # max_query_len=1 selects the small decode tiles (16 rows = 4 tokens x 4 heads).
    poison_outputs(attention_module)
    batch = make_paged_batch([1, 1, 1], [200, 3, 77], 8, 2, 64, block_size=16, seed=2)
    _check(batch, max_query_len=1, max_seq_len=200, num_splits=num_splits)


@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim,kv_heads,num_splits",
                         [(8, 4, 64, 2, 3), (4, 4, 32, 4, 3), (12, 4, 48, 4, 1)])
def test_several_kv_heads_a_program(poison_outputs, kv_heads, num_splits, num_q_heads, num_kv_heads, head_dim):
    """A program reading 2 or 4 kv heads' K/V side by side gives each query head its own head's
    attention: mixed decode and prefill rows, GQA and MHA, a head_dim padded to a power of two."""
    from splitserve.kernels.paged_attention import LaunchConfig

    poison_outputs(attention_module)
    batch = make_paged_batch(*MIXED, num_q_heads, num_kv_heads, head_dim, seed=kv_heads + head_dim, strided_q=True)
    _check(batch, config=LaunchConfig(16, 32, 4, 2, kv_heads=kv_heads), num_splits=num_splits)
    _check(batch, sliding_window=24, logit_softcap=5.0, config=LaunchConfig(32, 16, 4, 2, kv_heads=kv_heads),
           num_splits=num_splits)


@pytest.mark.parametrize("num_kv_heads", [3, 6])
def test_kv_heads_a_program_that_do_not_divide_the_heads(poison_outputs, num_kv_heads):
    """4 a program over 3 kv heads reads one at a time, over 6 two at a time."""
    from splitserve.kernels.paged_attention import LaunchConfig

    poison_outputs(attention_module)
    batch = make_paged_batch([1, 1, 1], [200, 3, 77], 2 * num_kv_heads, num_kv_heads, 64, seed=5)
    _check(batch, config=LaunchConfig(16, 32, 4, 2, kv_heads=4), max_query_len=1, max_seq_len=200)


def test_small_grid_rule_and_its_tiles(poison_outputs):
    """A short prefill over a long history on an under-filled GPU takes the small-grid tiles;
    a long chunk or a large batch does not; the small-grid tiles give the reference's output."""
    from splitserve.kernels.paged_attention import LaunchConfig, is_small_grid, launch_config, query_tiles

    default = launch_config(128, decode_only=False)  # 128-row tiles, 4 query heads per kv head (8B)
    assert query_tiles(528, 1, default, 4) == (32, 17)
    assert is_small_grid(query_tiles(528, 1, default, 4)[1], 8, 132)  # the retained 8B turn: 136 programs on 132 SMs
    assert not is_small_grid(query_tiles(2048, 1, default, 4)[1], 8, 132)
    assert not is_small_grid(query_tiles(32 * 512, 32, default, 4)[1], 8, 132)
    small = launch_config(128, decode_only=False, small_grid=True)
    assert small == LaunchConfig(64, 64, 4, 3) and launch_config(128, True, small_grid=True).block_m == 16
    poison_outputs(attention_module)
    batch = make_paged_batch([40, 1], [300, 90], 4, 2, 64, seed=9)
    _check(batch, config=small, num_splits=1)


def test_head_dim_128_block_size_8():
    batch = make_paged_batch([2, 1], [20, 33], 4, 2, 128, block_size=8, seed=4)
    _check(batch, num_splits=2)


def test_half_precision_inputs(poison_outputs):
    # 16-bit K/V take the probabilities cast down to their dtype before the PV product. (fp16 here:
    # the interpreter's bf16 tl.dot is wrong; loadtests/gpu_kernels.py covers bf16 on a GPU.)
    poison_outputs(attention_module)
    batch = make_paged_batch(*MIXED, 4, 2, 64, dtype=torch.float16, seed=12)
    for num_splits in (1, 2):
        out = paged_attention(*batch.args(), num_splits=num_splits)
        assert out.dtype == torch.float16 and not out.isnan().any()
        ref = paged_attention_ref(batch.q.float(), *batch.args()[1:])
        torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)


def test_more_splits_than_key_tiles(poison_outputs):
    # Splits that get no keys must not disturb the log-sum-exp merge.
    poison_outputs(attention_module)
    batch = make_paged_batch([1, 3], [5, 3], 4, 2, 32, seed=6)
    _check(batch, num_splits=4)


def test_empty_request_in_batch():
    batch = make_paged_batch([2, 0, 1], [10, 4, 6], 4, 2, 32, seed=8)
    _check(batch)


def test_rejects_wrong_metadata_dtype():
    batch = make_paged_batch([1], [4], 2, 2, 32)
    batch.seq_lens = batch.seq_lens.long()
    with pytest.raises(TypeError, match="seq_lens"):
        paged_attention(*batch.args())
