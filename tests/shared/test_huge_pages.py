"""`shared/huge_pages.py`: the CPU KV pool's zeros with transparent huge pages asked for."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from splitserve.shared import huge_pages

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def test_zeros_are_zeros_of_the_shape_and_dtype():
    pool = huge_pages.zeros(3, 2, 2, 16, 4, 32, dtype=torch.bfloat16, device=torch.device("cpu"))
    assert pool.shape == (3, 2, 2, 16, 4, 32) and pool.dtype == torch.bfloat16 and not pool.any()


def test_a_tensor_without_a_whole_huge_page_is_not_advised():
    assert huge_pages.advise(torch.empty(1000)) is False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not THP.exists() or "[never]" in THP.read_text(),
                    reason="no transparent huge pages here")
def test_a_large_tensor_is_advised_where_the_kernel_has_them():
    assert huge_pages.advise(torch.empty(4 * huge_pages.HUGE_PAGE // 4)) is True
