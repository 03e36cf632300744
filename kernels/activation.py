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


def silu_and_mul(*args, **kwargs):  # Triton wrapper: in progress
    raise NotImplementedError("Triton silu_and_mul is not written yet; use silu_and_mul_ref")
