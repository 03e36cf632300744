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



@triton.jit
def _rotate_heads(out_ptr, x_ptr, tok, stride_xt, stride_xh, cos, sin,
                  NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    # x: [NUM_HEADS, 2*HALF] rows of one token; cos, sin: [1, HALF_PAD] fp32. Output is contiguous.
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, HALF_PAD)[None, :]
    mask = (heads < NUM_HEADS) & (dims < HALF)
    src = x_ptr + tok * stride_xt + heads * stride_xh + dims
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = out_ptr + (tok * NUM_HEADS + heads) * (2 * HALF) + dims
    tl.store(dst, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_out_ptr, k_out_ptr, q_ptr, k_ptr, positions_ptr, cos_sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cache,
    NUM_Q_HEADS: tl.constexpr, Q_HEADS_PAD: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr, KV_HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr,
):
    # One program per token: both q and k heads share the token's cos/sin row.
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + tok).to(tl.int64)
    dims = tl.arange(0, HALF_PAD)[None, :]
    cos = tl.load(cos_sin_ptr + pos * stride_cache + dims, mask=dims < HALF, other=0.0)
    sin = tl.load(cos_sin_ptr + pos * stride_cache + HALF + dims, mask=dims < HALF, other=0.0)
    _rotate_heads(q_out_ptr, q_ptr, tok, stride_qt, stride_qh, cos, sin, NUM_Q_HEADS, Q_HEADS_PAD, HALF, HALF_PAD)
    _rotate_heads(k_out_ptr, k_ptr, tok, stride_kt, stride_kh, cos, sin, NUM_KV_HEADS, KV_HEADS_PAD, HALF, HALF_PAD)


def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton rotary; same contract as `rotary_embedding_ref`. Returns new contiguous tensors."""
    require_triton()
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"expected q [T, Hq, D] and k [T, Hkv, D]; got {tuple(q.shape)} and {tuple(k.shape)}")
    num_tokens, num_q_heads, head_dim = q.shape
    if head_dim % 2 or cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != head_dim:
        raise ValueError(f"cos_sin_cache must be [max_pos, D={head_dim}] with even D; got {tuple(cos_sin_cache.shape)}")
    if cos_sin_cache.dtype != torch.float32 or cos_sin_cache.stride(1) != 1:
        raise TypeError(f"cos_sin_cache must be contiguous fp32; got {cos_sin_cache.dtype}")
    if positions.shape != (num_tokens,) or positions.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"positions must be int [T={num_tokens}]; got {positions.dtype} {tuple(positions.shape)}")
    if q.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError("q and k need a contiguous head_dim (last stride 1)")
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    half = head_dim // 2
    _rotary_kernel[(num_tokens,)](
        q_out, k_out, q, k, positions, cos_sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        NUM_Q_HEADS=num_q_heads, Q_HEADS_PAD=triton.next_power_of_2(num_q_heads),
        NUM_KV_HEADS=k.shape[1], KV_HEADS_PAD=triton.next_power_of_2(k.shape[1]),
        HALF=half, HALF_PAD=triton.next_power_of_2(half),
    )
    return q_out, k_out
