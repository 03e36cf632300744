"""bf16 linears on CPU through oneDNN with each weight reordered once into oneDNN's blocked layout
(`torch.ops.mkldnn._reorder_linear_weight`, what inductor's CPU freezing does), instead of
`F.linear` reordering it on every call. Same oneDNN kernels, so the results are bit-identical to
`F.linear`'s; on the demo model a bf16 decode step at 16 rows went from 6.2-6.5 to 5.4 ms
(docs/benchmarks.md section 23).

The reordered copy lives beside the weight (held on the weight itself, rebuilt when the weight's
storage or version changes), so bf16 linear weights take twice their memory on CPU. fp32, other
devices, and CPUs without oneDNN's bf16 take `F.linear`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

_BATCH_HINT = 16
"""The row count oneDNN picks the blocked layout for (any row count runs on it)."""


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, through the reordered weight where it applies."""
    if not _applies(x, weight, bias):
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, _reordered(weight), bias, "none", [], "")


def _applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (x.dtype == weight.dtype == torch.bfloat16 and x.device.type == weight.device.type == "cpu"
            and weight.dim() == 2 and (bias is None or bias.dtype == torch.bfloat16) and native_bf16()
            and not torch.is_grad_enabled())


def _reordered(weight: torch.Tensor) -> torch.Tensor:
    version = 0 if weight.is_inference() else weight._version  # inference tensors have no counter
    key = (weight.data_ptr(), version, tuple(weight.shape))
    cached = getattr(weight, "_splitserve_reordered", None)
    if cached is None or cached[0] != key:
        cached = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _BATCH_HINT))
        weight._splitserve_reordered = cached
    return cached[1]


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX, as oneDNN reports it).
    Without, bf16 matmuls are emulated: on an AVX2-only EPYC the demo's bf16 linears ran 3x
    slower than float32 (docs/benchmarks.md section 24)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
