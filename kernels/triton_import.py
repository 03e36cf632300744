"""Guarded Triton import shared by the kernel files.

`kernels` must import on machines without Triton (the CPU engine runs the torch references).
When Triton is missing, `triton.jit` becomes a decorator whose kernels raise on launch, and `tl`
carries just enough (`tl.constexpr`) for the kernel signatures to be defined.
"""

from __future__ import annotations

import types

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only install: the references still work.
    HAS_TRITON = False

    class _MissingKernel:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            raise RuntimeError(f"Triton is not installed; cannot launch kernel {self.fn.__name__}")

    def _jit(fn=None, **_kwargs):
        if fn is None:
            return _MissingKernel
        return _MissingKernel(fn)

    def _next_power_of_2(n: int) -> int:
        return 1 << max(0, int(n) - 1).bit_length()

    def _cdiv(a: int, b: int) -> int:
        return -(-a // b)

    triton = types.SimpleNamespace(jit=_jit, next_power_of_2=_next_power_of_2, cdiv=_cdiv)
    tl = types.SimpleNamespace(constexpr=object)


def require_triton() -> None:
    """Raise a clear error before a launch when Triton cannot run here."""
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed; use the *_ref functions on this machine")
