"""Kernel tests: Triton kernels run on CPU through the Triton interpreter.

`TRITON_INTERPRET` is read when `@triton.jit` decorates a kernel, i.e. when a kernel module is
imported, so it is set here at import time, and kernel modules that something imported earlier
(without the variable) are reloaded so their kernels become interpretable.
"""

from __future__ import annotations

import importlib
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

_KERNEL_MODULES = ["triton_import", "paged_attention", "paged_attention_cpu", "kv_cache_write", "rms_norm", "rotary", "activation", "moe_config", "moe_align", "fused_moe", "ops"]
for _name in _KERNEL_MODULES:
    _module = sys.modules.get(f"splitserve.kernels.{_name}")
    if _module is not None:
        importlib.reload(_module)

from splitserve.kernels.triton_import import HAS_TRITON  # noqa: E402

needs_triton = pytest.mark.skipif(
    not HAS_TRITON or os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton is not importable (or TRITON_INTERPRET is not 1), so kernels cannot run on CPU",
)


class _PoisonedTorch:
    """Stands in for `torch` inside a kernel module: fresh float buffers start as NaN."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-(2**30))

    def empty(self, *args, **kwargs):
        return self._poison(torch.empty(*args, **kwargs))

    def empty_like(self, *args, **kwargs):
        return self._poison(torch.empty_like(*args, **kwargs))


@pytest.fixture
def poison_outputs(monkeypatch):
    """Call with a kernel module: its `torch.empty*` outputs come back NaN-filled, so an element the
    kernel forgets to write shows up as NaN instead of passing by luck."""

    def poison(module) -> None:
        monkeypatch.setattr(module, "torch", _PoisonedTorch())

    return poison
