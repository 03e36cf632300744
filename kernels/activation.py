"""SwiGLU gate: `silu(x[:, :I]) * x[:, I:]` for the fused gate/up projection output `x [T, 2I]`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from splitserve.kernels.triton_import import require_triton, tl, triton


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """`x [T, 2I]` -> `[T, I]` in `x.dtype`, computed in fp32."""
    inter = x.shape[-1] // 2
    x32 = x.float()
    return (F.silu(x32[..., :inter]) * x32[..., inter:]).to(x.dtype)



@triton.jit
def _silu_and_mul_kernel(out_ptr, x_ptr, stride_x, INTER: tl.constexpr, BLOCK: tl.constexpr):
    # Grid: (T, cdiv(I, BLOCK)); each program gates BLOCK columns of one row.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTER
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + INTER + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * INTER + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Triton SwiGLU gate; same contract as `silu_and_mul_ref`."""
    require_triton()
    if x.dim() != 2 or x.shape[1] % 2 or x.stride(1) != 1:
        raise ValueError(f"expected x [T, 2I] with contiguous rows; got {tuple(x.shape)} strides {x.stride()}")
    inter = x.shape[1] // 2
    out = torch.empty(x.shape[0], inter, dtype=x.dtype, device=x.device)
    if x.shape[0] == 0:
        return out
    block = min(1024, triton.next_power_of_2(inter))
    _silu_and_mul_kernel[(x.shape[0], triton.cdiv(inter, block))](out, x, x.stride(0), INTER=inter, BLOCK=block)
    return out
