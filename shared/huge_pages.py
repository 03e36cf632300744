"""Transparent huge pages for a large host tensor (Linux `madvise(MADV_HUGEPAGE)`).

On CPU the KV pool is hundreds of MiB that a decode step reads in 4 KiB runs scattered through
it (one block of one layer); with 4 KiB pages nearly every run is a TLB miss. Where the kernel's
THP mode is `madvise` (a common default) nothing is huge unless asked for: on the demo model's
decode attention over a 490 MiB pool, asking took a call from 321 to 227 us
(docs/benchmarks.md section 23). Elsewhere (another OS, THP `never`) it is a no-op.
"""

from __future__ import annotations

import ctypes
import logging
import sys

import torch

logger = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14


def zeros(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`torch.zeros` that, on CPU, asks for huge pages before the first touch faults the pages in."""
    if device.type != "cpu":
        return torch.zeros(*shape, dtype=dtype, device=device)
    tensor = torch.empty(*shape, dtype=dtype)
    advise(tensor)
    return tensor.zero_()


def advise(tensor: torch.Tensor) -> bool:
    """Ask for huge pages over the whole 2 MiB pages inside `tensor`'s memory; False when the OS
    has no such call or refuses (the tensor works the same either way)."""
    start = -(-tensor.data_ptr() // HUGE_PAGE) * HUGE_PAGE
    end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // HUGE_PAGE * HUGE_PAGE
    if not sys.platform.startswith("linux") or end <= start:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_HUGEPAGE) != 0:
        logger.debug("madvise(MADV_HUGEPAGE) refused: errno %d", ctypes.get_errno())
        return False
    return True
