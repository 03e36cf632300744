"""A decoder layer's small ops on CPU in C (`elementwise_cpu.c`): each is one call where the torch
reference is five to fifteen ops, each with its own dispatch and temporaries. On the demo model
those ops were ~1.3 ms of a 7 ms bf16 decode step (docs/benchmarks.md section 23).

Every function returns None when the native library is unavailable (`native_cpu.py`) or does not
take the tensors, and the caller keeps its reference. The rotary and the cache write are
bit-identical to their references in fp32 and bf16. RMSNorm and SwiGLU are not (the sum of squares
runs in another order; the exponential is a polynomial), so they run here for bf16 only: in fp32,
the CPU's parity mode, the references keep transformers' op order; in bf16 the final rounding
absorbs the difference almost always (tests/kernels/test_elementwise_cpu.py).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from splitserve.kernels import native_cpu

SOURCE = Path(__file__).with_name("elementwise_cpu.c")
_P, _I, _L, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
SIGNATURES = {
    "rms_norm": [_P, _L, _P, _L, _P, _P, _P, _I, _I, _F, _I],
    "silu_and_mul": [_P, _L, _P, _I, _I, _I],
    "rotary": [_P, _P, _L, _L, _P, _I, _I, _I, _P, _L, _I],
    "write_kv": [_P, _L, _L, _P, _L, _L, _P, _P, _L, _P, _I, _I, _I, _I],
}
_EXACT = (torch.float32, torch.bfloat16)
"""dtypes of the bit-identical ops."""
_ROUNDED = (torch.bfloat16,)
"""dtypes of the ops whose fp32 arithmetic differs from the reference's in the last bits."""


def rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
             eps: float) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """`x [T, H]` (and `residual [T, H]`) -> `(normed, x + residual or None)`, rms_norm_ref's
    rounding; None when not taken (fp32, a strided row, another dtype)."""
    library = _library()
    tensors = (x, weight) if residual is None else (x, weight, residual)
    if library is None or not _rows(x, _ROUNDED) or not _same(tensors) or weight.shape != (x.shape[-1],):
        return None
    if residual is not None and (residual.shape != x.shape or residual.stride(-1) != 1):
        return None
    rows, hidden = x.shape
    out = torch.empty(rows, hidden, dtype=x.dtype)
    summed = None if residual is None else torch.empty_like(out)
    weight = weight.contiguous()  # held until the call returns
    library.rms_norm(x.data_ptr(), x.stride(0), _ptr(residual), 0 if residual is None else residual.stride(0),
                     _ptr(summed), weight.data_ptr(), out.data_ptr(), rows, hidden, eps, _bf16(x))
    return out, summed


def silu_and_mul(x: torch.Tensor) -> torch.Tensor | None:
    """`x [T, 2I]` -> `silu(x[:, :I]) * x[:, I:]` rounded once; None when not taken."""
    library = _library()
    if library is None or not _rows(x, _ROUNDED) or x.shape[-1] % 2:
        return None
    rows, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty(rows, inter, dtype=x.dtype)
    library.silu_and_mul(x.data_ptr(), x.stride(0), out.data_ptr(), rows, inter, _bf16(x))
    return out


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Neox rotary of `q [T, Hq, D]`, `k [T, Hkv, D]` into new contiguous tensors; None when not taken."""
    library = _library()
    if (library is None or not _heads(q) or not _heads(k) or not _same((q, k)) or q.shape[-1] % 2
            or cos_sin_cache.dtype != torch.float32 or cos_sin_cache.stride(-1) != 1
            or cos_sin_cache.shape[-1] != q.shape[-1] or positions.device.type != "cpu"):
        return None
    pos = positions.to(torch.int64).contiguous()
    table = cos_sin_cache.data_ptr(), cos_sin_cache.stride(0)
    return _rotate(library, pos, q, table), _rotate(library, pos, k, table)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> bool:
    """Copy `k, v [T, Hkv, D]` into their slots (negative: skipped) in place; False when not taken
    (the caller then runs the reference)."""
    library = _library()
    _, block_size, heads, dim = k_cache.shape
    inner = (heads * dim, dim, 1)
    if (library is None or not _heads(k) or not _heads(v) or not _same((k, v, k_cache, v_cache))
            or k_cache.stride() != v_cache.stride() or k_cache.stride()[1:] != inner
            or k.shape[1:] != (heads, dim) or v.shape != k.shape or slot_mapping.device.type != "cpu"):
        return False
    slots = slot_mapping.to(torch.int64).contiguous()
    size = k.element_size()
    library.write_kv(k.data_ptr(), k.stride(0) * size, k.stride(1) * size, v.data_ptr(), v.stride(0) * size,
                     v.stride(1) * size, k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0) * size,
                     slots.data_ptr(), k.shape[0], heads, dim * size, block_size)
    return True


def _rotate(library: ctypes.CDLL, positions: torch.Tensor, x: torch.Tensor, table: tuple[int, int]) -> torch.Tensor:
    tokens, heads, dim = x.shape
    out = torch.empty(tokens, heads, dim, dtype=x.dtype)
    library.rotary(positions.data_ptr(), x.data_ptr(), x.stride(0), x.stride(1), out.data_ptr(), tokens, heads, dim,
                   table[0], table[1], _bf16(x))
    return out


def _rows(x: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> bool:
    """A CPU `[T, H]` tensor of one of `dtypes` whose rows are contiguous."""
    return x.device.type == "cpu" and x.dim() == 2 and x.dtype in dtypes and x.stride(-1) == 1


def _heads(x: torch.Tensor) -> bool:
    """A CPU `[T, H, D]` tensor of a bit-identical dtype whose heads are contiguous."""
    return x.device.type == "cpu" and x.dim() == 3 and x.dtype in _EXACT and x.stride(-1) == 1


def _same(tensors: tuple[torch.Tensor, ...]) -> bool:
    return all(t.dtype == tensors[0].dtype and t.device.type == "cpu" for t in tensors)


def _bf16(x: torch.Tensor) -> int:
    return int(x.dtype == torch.bfloat16)


def _ptr(x: torch.Tensor | None) -> int | None:
    return None if x is None else x.data_ptr()


@functools.cache
def _library() -> ctypes.CDLL | None:
    return native_cpu.open_library(SOURCE, SIGNATURES, ("-ffp-contract=off",))
