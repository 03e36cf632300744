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



@triton.jit
def _rms_norm_kernel(
    out_ptr, residual_out_ptr, x_ptr, residual_ptr, weight_ptr, eps,
    stride_x, stride_r,
    HIDDEN: tl.constexpr,
    BLOCK_H: tl.constexpr,
    ADD_RESIDUAL: tl.constexpr,
):
    # One program per row; the whole row fits in one block (BLOCK_H = next_pow2(HIDDEN)).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < HIDDEN
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if ADD_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        x_sum = (x + r).to(out_ptr.dtype.element_ty)  # HF adds in the model dtype
        tl.store(residual_out_ptr + row * HIDDEN + cols, x_sum, mask=mask)
        x = x_sum.to(tl.float32)
    variance = tl.sum(x * x, axis=0) / HIDDEN
    normed = (x * tl.rsqrt(variance + eps)).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * HIDDEN + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> None:
    if x.dim() != 2 or weight.shape != (x.shape[1],):
        raise ValueError(f"expected x [T, H] and weight [H]; got x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if x.stride(1) != 1 or weight.stride(0) != 1:
        raise ValueError("x rows and weight must be contiguous in the hidden dim")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(1) != 1):
        raise ValueError(f"residual must match x {tuple(x.shape)} {x.dtype}; got {tuple(residual.shape)} {residual.dtype}")


def _launch(x, residual, weight, eps) -> tuple[torch.Tensor, torch.Tensor | None]:
    require_triton()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    residual_out = torch.empty_like(out) if residual is not None else None
    if x.shape[0] == 0:
        return out, residual_out
    hidden = x.shape[1]
    _rms_norm_kernel[(x.shape[0],)](
        out, residual_out if residual is not None else out, x, residual if residual is not None else x,
        weight, eps, x.stride(0), residual.stride(0) if residual is not None else 0,
        HIDDEN=hidden, BLOCK_H=triton.next_power_of_2(hidden), ADD_RESIDUAL=residual is not None,
        num_warps=8 if hidden >= 4096 else 4,
    )
    return out, residual_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton RMSNorm; same contract as `rms_norm_ref`."""
    _check(x, weight)
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton add + RMSNorm in one pass; same contract as `fused_add_rms_norm_ref`."""
    _check(x, weight, residual)
    return _launch(x, residual, weight, eps)
