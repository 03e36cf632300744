"""Paged decode attention on CPU in C (`paged_decode_cpu.c`): every decode row's query over its
context read in place from the paged cache, where the torch path first gathers each row's blocks
into a copy (index_select) that its attention then reads again. On the demo model the gather and
torch's fused attention were ~40 % of a decode step (docs/benchmarks.md section 22).

The C file is compiled on first use with the machine's C compiler (`$CC`, else `cc` or `gcc`;
`-O3 -march=native`) into `~/.cache/splitserve/native/` (`$SPLITSERVE_NATIVE_CACHE`), keyed by
the source, the flags and the CPU, and loaded with ctypes (which releases the GIL during the call).
Without a compiler, or with `SPLITSERVE_CPU_NATIVE=0`, `paged_decode` returns None and the caller
keeps its torch path. fp32 and bf16 caches; a soft cap stays on the torch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("paged_decode_cpu.c")
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC",
         "-std=gnu11")
MAX_HEAD_DIM = 256
"""The C file's vector registers hold one position's head of at most this many values."""
COMPILE_TIMEOUT_S = 120.0
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_ARGTYPES = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_void_p,
             ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
             ctypes.c_float, ctypes.c_int, ctypes.c_void_p]


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                 lens: list[int], scale: float, sliding_window: int | None) -> torch.Tensor | None:
    """Decode rows `q [R, Hq, D]` (each the last position of its context `lens[r]`) over the caches
    `[num_blocks, block_size, Hkv, D]` through `tables [R, >= ceil(len / block_size)]`; None when
    the native kernel is unavailable or does not take these tensors (the caller's path then)."""
    library = _library()
    if library is None or not _takes(q, k_cache, v_cache):
        return None
    num_rows, num_q_heads, head_dim = q.shape
    query = q.float().contiguous()
    out = torch.empty_like(query)
    tables32 = tables.to(torch.int32).contiguous()
    lens32 = torch.tensor(lens, dtype=torch.int32)
    status = library.paged_decode(
        query.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), _DTYPES[k_cache.dtype], k_cache.stride(0),
        tables32.data_ptr(), tables32.stride(0), lens32.data_ptr(), num_rows, num_q_heads, k_cache.shape[2],
        head_dim, k_cache.shape[1], scale, sliding_window or 0, out.data_ptr())
    if status != 0:
        raise MemoryError("paged_decode: no scratch memory for the attention scores")
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
    if os.environ.get("SPLITSERVE_CPU_NATIVE", "1") == "0":
        return None
    try:
        return load(build())
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("the native CPU decode attention is unavailable (%s): using the torch path", exc)
        return None


def load(path: Path) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
    library.paged_decode.argtypes = _ARGTYPES
    library.paged_decode.restype = ctypes.c_int
    return library


def build(extra_flags: tuple[str, ...] = ()) -> Path:
    """The shared library for this source, flags and CPU, compiled once (atomically: processes
    that start together may both compile; the last rename wins, each loads a whole file).
    `extra_flags` (tests: `-DLANES=4` for another vector width) join the key and the command."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (set CC)")
    source = SOURCE.read_bytes()
    flags = (*FLAGS, *extra_flags)
    key = hashlib.sha256(source + " ".join((compiler, *flags, platform.machine(), _cpu_flags())).encode())
    cache = Path(os.environ.get("SPLITSERVE_NATIVE_CACHE", Path.home() / ".cache" / "splitserve" / "native"))
    target = cache / f"paged_decode_{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        built = Path(tmp) / target.name
        subprocess.run([compiler, *flags, str(SOURCE), "-o", str(built), "-lm"], check=True, capture_output=True,
                       timeout=COMPILE_TIMEOUT_S)
        os.replace(built, target)
    return target


def _cpu_flags() -> str:
    """The CPU's feature flags (-march=native code must not run on another CPU sharing the cache)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), platform.processor())
    except OSError:
        return platform.processor()
