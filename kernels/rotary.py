"""Rotary position embedding, neox / rotate-half style as in HF Llama.

`cos_sin_cache[pos]` is `cos[D/2] ‖ sin[D/2]` (fp32). For `x = x1 ‖ x2` (halves of the head dim):
`out = (x1*cos - x2*sin) ‖ (x2*cos + x1*sin)`, which is HF's `x*cos + rotate_half(x)*sin` with
`cos = cat(freqs, freqs).cos()`. Both paths return new tensors (inputs are not modified) and
compute in fp32.
"""

from __future__ import annotations

import torch

from splitserve.kernels.triton_import import require_triton, tl, triton


def compute_cos_sin_cache(
    inv_freq: torch.Tensor, max_pos: int, attention_scaling: float = 1.0
) -> torch.Tensor:
    """`inv_freq [D/2]` -> `[max_pos, D]` fp32 rows `cos ‖ sin`, both multiplied by `attention_scaling`."""
    positions = torch.arange(max_pos, dtype=torch.float32, device=inv_freq.device)
    freqs = torch.outer(positions, inv_freq.float())  # [max_pos, D/2]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1) * attention_scaling


def _rotate_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [T, H, D]; cos, sin [T, 1, D/2]
    half = x.shape[-1] // 2
    x32 = x.float()
    x1, x2 = x32[..., :half], x32[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def rotary_embedding_ref(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`positions [T]`, `q [T, Hq, D]`, `k [T, Hkv, D]` -> rotated `(q, k)` as new tensors."""
    half = q.shape[-1] // 2
    rows = cos_sin_cache[positions.long()].float()  # [T, D]
    cos, sin = rows[:, None, :half], rows[:, None, half:]
    return _rotate_ref(q, cos, sin), _rotate_ref(k, cos, sin)


def rotary_embedding(*args, **kwargs):  # Triton wrapper: in progress
    raise NotImplementedError("Triton rotary_embedding is not written yet; use rotary_embedding_ref")
