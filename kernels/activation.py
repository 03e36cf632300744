"""Gated activations for the fused gate/up projection output `x [T, 2I]`:
SwiGLU `silu(x[:, :I]) * x[:, I:]` and GeGLU `gelu_tanh(x[:, :I]) * x[:, I:]` (Gemma)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from splitserve.kernels.triton_import import require_triton, tl, triton


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """`x [T, 2I]` -> `[T, I]` in `x.dtype`, computed in fp32."""
    inter = x.shape[-1] // 2
    x32 = x.float()
    return (F.silu(x32[..., :inter]) * x32[..., inter:]).to(x.dtype)


def gelu_tanh_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """`x [T, 2I]` -> `gelu(x[:, :I], approximate="tanh") * x[:, I:]` in `x.dtype`, computed in fp32."""
    inter = x.shape[-1] // 2
    x32 = x.float()
    return (F.gelu(x32[..., :inter], approximate="tanh") * x32[..., inter:]).to(x.dtype)


@triton.jit
def gate_activation(gate, ACTIVATION: tl.constexpr):
    """`gate` fp32 -> silu(gate) (ACTIVATION 0) or tanh-approximated gelu(gate) (ACTIVATION 1)."""
    if ACTIVATION == 0:
        return gate / (1.0 + tl.exp(-gate))
    inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)  # sqrt(2/pi) * (x + c x^3)
    tanh = 2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0
    return 0.5 * gate * (1.0 + tanh)


ACTIVATION_IDS = {"silu": 0, "gelu_pytorch_tanh": 1}


@triton.jit
def _act_and_mul_kernel(out_ptr, x_ptr, stride_x, INTER: tl.constexpr, BLOCK: tl.constexpr,
                        ACTIVATION: tl.constexpr):
    # Grid: (T, cdiv(I, BLOCK)); each program gates BLOCK columns of one row.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTER
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + INTER + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate_activation(gate, ACTIVATION) * up
    tl.store(out_ptr + row * INTER + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Triton SwiGLU gate; same contract as `silu_and_mul_ref`."""
    return act_and_mul(x, "silu")


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Triton GeGLU gate; same contract as `gelu_tanh_and_mul_ref`."""
    return act_and_mul(x, "gelu_pytorch_tanh")


def act_and_mul(x: torch.Tensor, activation: str) -> torch.Tensor:
    require_triton()
    if x.dim() != 2 or x.shape[1] % 2 or x.stride(1) != 1:
        raise ValueError(f"expected x [T, 2I] with contiguous rows; got {tuple(x.shape)} strides {x.stride()}")
    inter = x.shape[1] // 2
    out = torch.empty(x.shape[0], inter, dtype=x.dtype, device=x.device)
    if x.shape[0] == 0:
        return out
    block = min(1024, triton.next_power_of_2(inter))
    _act_and_mul_kernel[(x.shape[0], triton.cdiv(inter, block))](
        out, x, x.stride(0), INTER=inter, BLOCK=block, ACTIVATION=ACTIVATION_IDS[activation])
    return out
