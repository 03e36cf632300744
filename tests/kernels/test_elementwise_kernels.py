"""KV-cache write, RMSNorm, rotary and SiLU-and-mul: references against Hugging Face / hand math,
Triton (interpreter) against the references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import needs_triton
from splitserve.kernels import activation, kv_cache_write, rms_norm, rotary

# ---------------------------------------------------------------- references


def test_rms_norm_ref_matches_hf_llama_exactly():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(7, 96, generator=gen) * 3).to(dtype)
        layer = LlamaRMSNorm(96, eps=1e-6).to(dtype)
        layer.weight.data = torch.randn(96, generator=gen).to(dtype)
        torch.testing.assert_close(rms_norm.rms_norm_ref(x, layer.weight, 1e-6), layer(x), atol=0, rtol=0)
        residual = torch.randn(7, 96, generator=gen).to(dtype)
        normed, new_residual = rms_norm.fused_add_rms_norm_ref(x, residual, layer.weight, 1e-6)
        torch.testing.assert_close(new_residual, x + residual, atol=0, rtol=0)
        torch.testing.assert_close(normed, layer(x + residual), atol=0, rtol=0)


def test_rotary_ref_matches_hf_apply_rotary_pos_emb():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    head_dim, scaling = 64, 0.7
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    cache = rotary.compute_cos_sin_cache(inv_freq, 300, attention_scaling=scaling)
    positions = torch.tensor([0, 1, 17, 299, 5])
    q, k = torch.randn(5, 4, head_dim), torch.randn(5, 2, head_dim)
    emb = torch.cat([torch.outer(positions.float(), inv_freq)] * 2, dim=-1)  # [T, D]
    cos, sin = emb.cos() * scaling, emb.sin() * scaling
    # HF takes [batch, heads, T, D]; use T as the sequence of one batch row.
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    q_out, k_out = rotary.rotary_embedding_ref(positions, q, k, cache)
    torch.testing.assert_close(q_out, q_hf[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_out, k_hf[0].transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_silu_and_mul_ref():
    x = torch.randn(3, 2 * 40)
    torch.testing.assert_close(activation.silu_and_mul_ref(x), F.silu(x[:, :40]) * x[:, 40:])


def test_write_kv_cache_ref_into_strided_pool_view():
    pool = torch.full((6, 2, 2, 4, 2, 8), float("nan"))  # [N, layers, 2, bs, Hkv, D]
    k, v = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    kv_cache_write.write_kv_cache_ref(k, v, pool[:, 1, 0], pool[:, 1, 1], torch.tensor([9, -1, 22]))
    assert torch.equal(pool[2, 1, 0, 1], k[0]) and torch.equal(pool[5, 1, 1, 2], v[2])
    assert pool.isnan().sum() == pool.numel() - 4 * 2 * 8  # only 2 slots x (K, V) written


# ---------------------------------------------------------------- Triton vs reference


@needs_triton
def test_write_kv_cache_kernel_skips_negative_slots():
    pool = torch.full((5, 2, 2, 16, 2, 64), float("nan"))
    k_cache, v_cache = pool[:, 1, 0], pool[:, 1, 1]
    k, v = torch.randn(4, 2, 64), torch.randn(4, 2, 64)
    slots = torch.tensor([3, -1, 79, 40], dtype=torch.int64)
    kv_cache_write.write_kv_cache(k, v, k_cache, v_cache, slots)
    expected = torch.full_like(pool, float("nan"))
    kv_cache_write.write_kv_cache_ref(k, v, expected[:, 1, 0], expected[:, 1, 1], slots)
    torch.testing.assert_close(pool, expected, equal_nan=True, atol=0, rtol=0)


@needs_triton
@pytest.mark.parametrize("rows,hidden", [(5, 64), (5, 80), (37, 128), (3, 2048)])
def test_rms_norm_kernel(poison_outputs, rows, hidden):
    """Several rows share a program when they are short (37 rows of 128: 16 a program, the last one
    partly masked); a 2048-wide row has a program of its own."""
    poison_outputs(rms_norm)
    x = torch.randn(rows, hidden + 16)[:, :hidden] * 2  # rows strided wider than hidden
    weight = torch.randn(hidden)
    torch.testing.assert_close(rms_norm.rms_norm(x, weight, 1e-5), rms_norm.rms_norm_ref(x, weight, 1e-5), atol=1e-5, rtol=1e-5)


@needs_triton
def test_rms_norm_kernel_over_heads_of_a_fused_projection(poison_outputs):
    """q/k norms read [T, N, D] views of the fused qkv output in place (token stride N*D + more)."""
    poison_outputs(rms_norm)
    qkv = torch.randn(19, 6 * 32 + 2 * 32) * 2
    q = qkv[:, : 6 * 32].view(19, 6, 32)  # strides (256, 32, 1): not a [T*N, D] view
    weight = torch.randn(32)
    out = rms_norm.rms_norm(q, weight, 1e-6)
    assert out.shape == (19, 6, 32) and out.is_contiguous()
    torch.testing.assert_close(out, rms_norm.rms_norm_ref(q.reshape(-1, 32), weight, 1e-6).view(19, 6, 32),
                               atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fused_add_rms_norm_kernel(poison_outputs, dtype, tol):
    poison_outputs(rms_norm)
    x, residual, weight = torch.randn(21, 128).to(dtype), torch.randn(21, 128).to(dtype), torch.randn(128).to(dtype)
    normed, new_residual = rms_norm.fused_add_rms_norm(x, residual, weight, 1e-6)
    normed_ref, residual_ref = rms_norm.fused_add_rms_norm_ref(x, residual, weight, 1e-6)
    # fp32: the sum is exact. bf16: the interpreter truncates fp32 -> bf16 (the GPU rounds to
    # nearest), so allow one bf16 step there; loadtests/gpu_kernels.py checks the GPU rounding.
    torch.testing.assert_close(new_residual, residual_ref, atol=0 if dtype == torch.float32 else 1e-2, rtol=tol)
    torch.testing.assert_close(normed, normed_ref, atol=tol, rtol=tol)


@needs_triton
def test_rotary_kernel_on_qkv_views(poison_outputs):
    poison_outputs(rotary)
    head_dim, num_q_heads, num_kv_heads = 64, 6, 2
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    cache = rotary.compute_cos_sin_cache(inv_freq, 64)
    qkv = torch.randn(5, num_q_heads + 2 * num_kv_heads, head_dim)
    q, k = qkv[:, :num_q_heads], qkv[:, num_q_heads : num_q_heads + num_kv_heads]
    positions = torch.tensor([3, 0, 63, 10, 11])
    q_out, k_out = rotary.rotary_embedding(positions, q, k, cache)
    q_ref, k_ref = rotary.rotary_embedding_ref(positions, q, k, cache)
    torch.testing.assert_close(q_out, q_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_out, k_ref, atol=1e-5, rtol=1e-5)
    assert not torch.equal(q_out, q)  # a new tensor, rotated


@needs_triton
@pytest.mark.parametrize("inter", [40, 1100])  # not a power of two; more than one 1024-wide block
def test_silu_and_mul_kernel(poison_outputs, inter):
    poison_outputs(activation)
    x = torch.randn(3, 2 * inter) * 4
    torch.testing.assert_close(activation.silu_and_mul(x), activation.silu_and_mul_ref(x), atol=1e-5, rtol=1e-5)


def test_gelu_tanh_and_mul_ref_matches_hf_gelu_pytorch_tanh():
    from transformers.activations import ACT2FN

    x = torch.randn(5, 80) * 3
    torch.testing.assert_close(activation.gelu_tanh_and_mul_ref(x), ACT2FN["gelu_pytorch_tanh"](x[:, :40]) * x[:, 40:])


@needs_triton
def test_gelu_tanh_and_mul_kernel(poison_outputs):
    poison_outputs(activation)
    x = torch.randn(3, 2 * 40) * 4
    torch.testing.assert_close(activation.gelu_tanh_and_mul(x), activation.gelu_tanh_and_mul_ref(x), atol=1e-5, rtol=1e-5)


@needs_triton
def test_kernels_reject_bad_shapes():
    with pytest.raises(ValueError, match="weight"):
        rms_norm.rms_norm(torch.randn(2, 8), torch.randn(7), 1e-6)
    with pytest.raises(ValueError, match="slot_mapping"):
        kv_cache_write.write_kv_cache(
            torch.randn(2, 1, 16), torch.randn(2, 1, 16), torch.randn(2, 4, 1, 16), torch.randn(2, 4, 1, 16),
            torch.tensor([0], dtype=torch.int64),
        )
    with pytest.raises(ValueError, match=r"\[T, 2I\]"):
        activation.silu_and_mul(torch.randn(2, 7))
