"""C kernels for CPU tensors: each `.c` file here (with the `native_cpu.h` they share) is compiled
on first use with the machine's C compiler (`$CC`, else `cc` or `gcc`; `-O3 -march=native`) into
`~/.cache/splitserve/native/` (`$SPLITSERVE_NATIVE_CACHE`), keyed by the source, the header, the
flags and the CPU, and loaded with ctypes (which releases the GIL during each call). Without a
compiler, or with `SPLITSERVE_CPU_NATIVE=0`, `open_library` returns None and every caller keeps its
torch path.

Plain C through ctypes rather than a torch C++ extension: no torch headers, no C++ toolchain, and a
build of a few seconds (docs/architecture.md).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC",
         "-std=gnu11")
COMPILE_TIMEOUT_S = 120.0


def open_library(source: Path, signatures: dict[str, list], extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """`source` built and loaded with each function's ctypes argument types (all return int);
    None when switched off or when it cannot be built (logged once per caller's cache)."""
    if os.environ.get("SPLITSERVE_CPU_NATIVE", "1") == "0":
        return None
    try:
        return load(build(source, extra_flags), signatures)
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("the native CPU kernels of %s are unavailable (%s): using the torch path", source.name, exc)
        return None


def load(path: Path, signatures: dict[str, list]) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
    for name, argtypes in signatures.items():
        function = getattr(library, name)
        function.argtypes = argtypes
        function.restype = ctypes.c_int
    return library


def build(source: Path, extra_flags: tuple[str, ...] = ()) -> Path:
    """The shared library for this source, flags and CPU, compiled once (atomically: processes
    that start together may both compile; the last rename wins, each loads a whole file).
    `extra_flags` (a file's own, or the tests' `-DLANES=4`) join the key and the command."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (set CC)")
    flags = (*FLAGS, *extra_flags)
    headers = b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))  # what the sources include
    key = hashlib.sha256(source.read_bytes() + headers
                         + " ".join((compiler, *flags, platform.machine(), _cpu_flags())).encode())
    cache = Path(os.environ.get("SPLITSERVE_NATIVE_CACHE", Path.home() / ".cache" / "splitserve" / "native"))
    target = cache / f"{source.stem}_{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        built = Path(tmp) / target.name
        subprocess.run([compiler, *flags, str(source), "-o", str(built), "-lm"], check=True, capture_output=True,
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
