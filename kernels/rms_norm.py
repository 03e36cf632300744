"""RMSNorm and residual-add + RMSNorm with Hugging Face Llama numerics.

HF computes the normalisation in fp32, casts it back to the input dtype, then multiplies by the
weight: `weight * (x_fp32 * rsqrt(mean(x_fp32^2) + eps)).to(dtype)`. Both paths here do exactly that,
so outputs match `LlamaRMSNorm` bit for bit up to the order of the fp32 sum.
"""

from __future__ import annotations

import torch

from splitserve.kernels.triton_import import require_triton, tl, triton


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`x [T, H]`, `weight [H]` -> `[T, H]` in `x.dtype`."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * normed.to(x.dtype)).to(x.dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns `(rms_norm(x + residual), x + residual)`; the sum is rounded to `x.dtype` first, as HF does."""
    new_residual = x + residual
    return rms_norm_ref(new_residual, weight, eps), new_residual


def rms_norm(*args, **kwargs):  # Triton wrapper: in progress
    raise NotImplementedError("Triton rms_norm is not written yet; use rms_norm_ref")


def fused_add_rms_norm(*args, **kwargs):  # Triton wrapper: in progress
    raise NotImplementedError("Triton fused_add_rms_norm is not written yet; use fused_add_rms_norm_ref")
