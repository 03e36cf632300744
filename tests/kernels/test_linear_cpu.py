"""`kernels/linear_cpu.py`: bf16 CPU linears through a weight reordered once for oneDNN, bit for bit
`F.linear`'s results, rebuilt when the weight changes, and `F.linear` wherever it does not apply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from splitserve.kernels import linear_cpu, ops

needs_bf16 = pytest.mark.skipif(not linear_cpu.native_bf16(), reason="no oneDNN bf16 on this CPU")


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).bfloat16()


@needs_bf16
@pytest.mark.parametrize("rows", [0, 1, 16, 300])
@pytest.mark.parametrize("with_bias", [False, True])
@torch.inference_mode()
def test_bit_identical_to_f_linear(rows, with_bias):
    weight, x = randn(688, 256, seed=1), randn(rows, 256, seed=2)
    bias = randn(688, seed=3) if with_bias else None
    assert torch.equal(linear_cpu.linear(x, weight, bias), F.linear(x, weight, bias))
    assert hasattr(weight, "_splitserve_reordered")


@needs_bf16
@torch.inference_mode()
def test_three_d_and_strided_inputs():
    weight = randn(64, 128, seed=4)
    x3 = randn(2, 5, 128, seed=5)
    assert torch.equal(linear_cpu.linear(x3, weight), F.linear(x3, weight))
    strided = randn(7, 256, seed=6)[:, ::2]
    assert torch.equal(linear_cpu.linear(strided, weight), F.linear(strided, weight))


@needs_bf16
def test_a_changed_weight_is_reordered_again():
    weight = randn(32, 64, seed=7)
    x = randn(4, 64, seed=8)
    with torch.inference_mode():
        linear_cpu.linear(x, weight)
    weight.mul_(2)  # outside inference mode: the version counter moves
    with torch.inference_mode():
        assert torch.equal(linear_cpu.linear(x, weight), F.linear(x, weight))


def test_fp32_and_autograd_take_f_linear():
    weight = torch.randn(8, 16)
    x = torch.randn(3, 16)
    with torch.inference_mode():
        assert torch.equal(ops.linear(x, weight), F.linear(x, weight))
    trained = randn(8, 16).requires_grad_()
    ops.linear(randn(3, 16), trained).sum().backward()  # outside inference: torch's op, with its gradient
    assert trained.grad is not None and not hasattr(trained, "_splitserve_reordered")


def test_bf16_on_a_cpu_without_native_bf16_is_warned_about(caplog):
    """On CPU, asking for bfloat16 logs a warning exactly when this CPU emulates bf16 matmuls."""
    from splitserve.shared import engine_parts

    engine_parts._warn_if_bf16_is_emulated.cache_clear()
    with caplog.at_level("WARNING", logger="splitserve.shared.engine_parts"):
        assert engine_parts.resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
        assert engine_parts.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    warned = [r for r in caplog.records if "no native bfloat16 matmul" in r.getMessage()]
    assert len(warned) == (0 if linear_cpu.native_bf16() else 1)
