"""RMSNorm and residual-add + RMSNorm with Hugging Face Llama numerics.

HF computes the normalisation in fp32, casts it back to the input dtype, then multiplies by the
weight: `weight * (x_fp32 * rsqrt(mean(x_fp32^2) + eps)).to(dtype)`. Both paths here do exactly that,
so outputs match `LlamaRMSNorm` bit for bit up to the order of the fp32 sum.
"""

from __future__ import annotations

import torch

from splitserve.kernels.triton_import import require_triton, tl, triton


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`x [..., H]`, `weight [H]` -> `[..., H]` in `x.dtype`, normalised over the last dim."""
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
    num_rows, heads, stride_x, stride_h, stride_r,
    HIDDEN: tl.constexpr,
    BLOCK_H: tl.constexpr,
    ROWS: tl.constexpr,
    ADD_RESIDUAL: tl.constexpr,
):
    # ROWS rows per program, each whole in one block (BLOCK_H = next_pow2(HIDDEN)): short rows
    # (q/k norms over a head) share a program instead of leaving most of its threads idle.
    # Row r is head r % heads of token r // heads (heads = 1 for a [T, H] input).
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None]
    cols = tl.arange(0, BLOCK_H)[None, :]
    mask = (rows < num_rows) & (cols < HIDDEN)
    x_rows = (rows // heads) * stride_x + (rows % heads) * stride_h
    x = tl.load(x_ptr + x_rows + cols, mask=mask, other=0.0).to(tl.float32)
    if ADD_RESIDUAL:
        r = tl.load(residual_ptr + rows * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        x_sum = (x + r).to(out_ptr.dtype.element_ty)  # HF adds in the model dtype
        tl.store(residual_out_ptr + rows * HIDDEN + cols, x_sum, mask=mask)
        x = x_sum.to(tl.float32)
    variance = tl.sum(x * x, axis=1)[:, None] / HIDDEN
    normed = (x * tl.rsqrt(variance + eps)).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=cols < HIDDEN, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows * HIDDEN + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


# A program covers about this many elements: rows of a 128-wide head norm go 16 to a program.
_ELEMENTS_PER_PROGRAM = 2048


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> None:
    if x.dim() not in (2, 3) or weight.shape != (x.shape[-1],) or (residual is not None and x.dim() != 2):
        raise ValueError(f"expected x [T, H] (or [T, N, D] without a residual) and weight [H]; "
                         f"got x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if x.stride(-1) != 1 or weight.stride(0) != 1:
        raise ValueError("x rows and weight must be contiguous in the hidden dim")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(1) != 1):
        raise ValueError(f"residual must match x {tuple(x.shape)} {x.dtype}; got {tuple(residual.shape)} {residual.dtype}")


def _launch(x, residual, weight, eps) -> tuple[torch.Tensor, torch.Tensor | None]:
    require_triton()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    residual_out = torch.empty_like(out) if residual is not None else None
    if out.numel() == 0:
        return out, residual_out
    hidden, block_h = x.shape[-1], triton.next_power_of_2(x.shape[-1])
    heads, stride_h = (x.shape[1], x.stride(1)) if x.dim() == 3 else (1, 0)
    num_rows, rows = x.shape[0] * heads, max(1, _ELEMENTS_PER_PROGRAM // block_h)
    _rms_norm_kernel[(triton.cdiv(num_rows, rows),)](
        out, residual_out if residual is not None else out, x, residual if residual is not None else x,
        weight, eps, num_rows, heads, x.stride(0), stride_h, residual.stride(0) if residual is not None else 0,
        HIDDEN=hidden, BLOCK_H=block_h, ROWS=rows, ADD_RESIDUAL=residual is not None,
        num_warps=8 if hidden >= 4096 else 4,
    )
    return out, residual_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton RMSNorm; same contract as `rms_norm_ref`, which also takes `x [T, N, D]` (each of
    the N heads normalised over D; any strides but D's, so a q/k view of a fused projection
    needs no copy first). The output is contiguous."""
    _check(x, weight)
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton add + RMSNorm in one pass; same contract as `fused_add_rms_norm_ref`."""
    _check(x, weight, residual)
    return _launch(x, residual, weight, eps)
