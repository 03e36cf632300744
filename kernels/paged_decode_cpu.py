"""Paged decode attention on CPU in C (`paged_decode_cpu.c`): every decode row's query over its
context read in place from the paged cache, where the torch path first gathers each row's blocks
into a copy (index_select) that its attention then reads again. On the demo model the gather and
torch's fused attention were ~40 % of a decode step (docs/benchmarks.md section 22).

Built and loaded by `native_cpu.py` (the torch path without a compiler or with
`SPLITSERVE_CPU_NATIVE=0`). fp32 and bf16 caches; a soft cap stays on the torch path.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from splitserve.kernels import native_cpu

SOURCE = Path(__file__).with_name("paged_decode_cpu.c")
MAX_HEAD_DIM = 256
"""The C file's vector registers hold one position's head of at most this many values."""
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
PREFILL_MAX_HEAD_DIM = 32
"""The prefill chunk runs in C up to this head_dim, where it measured faster than torch's fused
SDPA (1.2-2.1x at 32; 0.75-1.4x at 64 and 128: docs/benchmarks.md section 23)."""
_P, _I, _L, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
SIGNATURES = {
    "paged_decode": [_P, _P, _P, _I, _L, _P, _L, _P, _I, _I, _I, _I, _I, _F, _I, _P],
    "paged_prefill": [_P, _P, _P, _I, _L, _P, _I, _I, _I, _I, _I, _I, _F, _I, _P],
}


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                 lens: list[int], scale: float, sliding_window: int | None) -> torch.Tensor | None:
    """Decode rows `q [R, Hq, D]` (each the last position of its context `lens[r]`) over the caches
    `[num_blocks, block_size, Hkv, D]` through `tables [R, >= ceil(len / block_size)]`; None when
    the native kernel is unavailable or does not take these tensors (the caller's path then)."""
    lens32 = torch.tensor(lens, dtype=torch.int32)  # held until the call returns
    rows = (tables.shape[1], lens32.data_ptr(), q.shape[0])  # the int32 copy's row stride, lengths, row count
    return _attend("paged_decode", q, k_cache, v_cache, tables, rows, scale, sliding_window)


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor, seq_len: int,
                  scale: float, sliding_window: int | None) -> torch.Tensor | None:
    """One request's query chunk `q [n, Hq, D]` (the last n positions of its context `seq_len`),
    causal, over its blocks `table [>= ceil(seq_len / block_size)]`; None when not taken."""
    return _attend("paged_prefill", q, k_cache, v_cache, table, (seq_len, q.shape[0]), scale, sliding_window)


def _attend(name: str, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
            own_args: tuple[int, ...], scale: float, sliding_window: int | None) -> torch.Tensor | None:
    """Call the C function `name` on fp32 queries and a contiguous int32 copy of the block ids, with
    `own_args` (its arguments between the tables and the head counts); the result in `q`'s dtype."""
    library = _library()
    if library is None or not _takes(q, k_cache, v_cache):
        return None
    head_dim = q.shape[2]
    query = q.float().contiguous()
    out = torch.empty_like(query)
    tables32 = tables.to(torch.int32).contiguous()
    status = getattr(library, name)(
        query.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), _DTYPES[k_cache.dtype], k_cache.stride(0),
        tables32.data_ptr(), *own_args, q.shape[1], k_cache.shape[2], head_dim, k_cache.shape[1], scale,
        sliding_window or 0, out.data_ptr())
    if status == -2:
        raise ValueError(f"paged attention in C: head_dim {head_dim} is beyond the kernel's {MAX_HEAD_DIM}")
    if status != 0:
        raise MemoryError("paged attention in C: no scratch memory")
    return out.to(q.dtype)


def _takes(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """CPU tensors, an fp32 or bf16 cache whose positions are contiguous, K and V alike."""
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    inner = (num_kv_heads * head_dim, head_dim, 1)
    return (q.device.type == k_cache.device.type == "cpu" and k_cache.dtype in _DTYPES
            and v_cache.dtype == k_cache.dtype and v_cache.shape == k_cache.shape
            and k_cache.stride() == v_cache.stride() and k_cache.stride()[1:] == inner
            and q.shape[1] % num_kv_heads == 0 and q.shape[2] == head_dim <= MAX_HEAD_DIM)


@functools.cache
def _library() -> ctypes.CDLL | None:
    return native_cpu.open_library(SOURCE, SIGNATURES)
