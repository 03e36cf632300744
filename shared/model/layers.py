"""Building blocks of the Llama family: RMSNorm, rotary embedding, gated MLP, merged projections.

Every numeric op goes through `splitserve.kernels.ops` (Triton on GPU, torch reference on CPU).
The merged projections keep Hugging Face's separate matrices as row blocks of one weight, so
one GEMM serves q/k/v (or gate/up); `load_shard` copies one HF matrix into its rows.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from splitserve.kernels import ops
from splitserve.kernels.rotary import compute_cos_sin_cache


class UnsupportedRopeError(NotImplementedError):
    """The checkpoint asks for a RoPE scaling type this implementation does not compute."""


class RMSNorm(nn.Module):
    """`forward(x)` normalises; `forward(x, residual)` adds first and also returns the sum."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.fused_add_rms_norm(x, residual, self.weight, self.eps)  # (normed, x + residual)


class MergedLinear(nn.Linear):
    """One linear layer standing for several stacked ones (q/k/v, gate/up): `shards` name
    the row blocks in order with their output sizes."""

    def __init__(self, in_features: int, shards: dict[str, int], bias: bool) -> None:
        super().__init__(in_features, sum(shards.values()), bias=bias)
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, size in shards.items():
            self.shard_offsets[name] = (offset, size)
            offset += size

    def load_shard(self, param_name: str, shard: str, tensor: torch.Tensor) -> None:
        """Copy one checkpoint matrix (or bias) into its rows of `weight` (or `bias`)."""
        param = getattr(self, param_name)
        offset, size = self.shard_offsets[shard]
        target = param.data.narrow(0, offset, size)
        if target.shape != tensor.shape:
            raise ValueError(f"shard {shard!r} of {param_name}: expected shape {tuple(target.shape)}, got {tuple(tensor.shape)}")
        target.copy_(tensor)


class GatedMLP(nn.Module):
    """SwiGLU: `down(silu(gate(x)) * up(x))` with gate and up merged into one GEMM."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool, hidden_act: str) -> None:
        super().__init__()
        if hidden_act != "silu":
            raise ValueError(f"only hidden_act='silu' is supported, the checkpoint has {hidden_act!r}")
        self.gate_up_proj = MergedLinear(hidden_size, {"gate": intermediate_size, "up": intermediate_size}, bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [T, 2I]
        return self.down_proj(ops.silu_and_mul(gate_up))  # [T, I] -> [T, H]


class RotaryEmbedding(nn.Module):
    """Applies RoPE to the first `rotary_dim` channels of each head (all of them unless the
    checkpoint sets `partial_rotary_factor`)."""

    def __init__(self, head_dim: int, rotary_dim: int, max_positions: int, rope: dict[str, Any]) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        inv_freq, attention_scaling = rope_inverse_frequencies(rope, rotary_dim, max_positions)
        # [max_positions, rotary_dim] rows cos ‖ sin, fp32; not a checkpoint weight.
        cache = compute_cos_sin_cache(inv_freq, max_positions, attention_scaling)
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # q [T, Hq, D], k [T, Hkv, D]
        if self.rotary_dim == self.head_dim:
            return ops.rotary_embedding(positions, q, k, self.cos_sin_cache)
        r = self.rotary_dim
        q_rot, k_rot = ops.rotary_embedding(positions, q[..., :r], k[..., :r], self.cos_sin_cache)
        return torch.cat([q_rot, q[..., r:]], dim=-1), torch.cat([k_rot, k[..., r:]], dim=-1)


def rope_parameters(hf_config: Any) -> dict[str, Any]:
    """The RoPE settings as one dict with `rope_type` and `rope_theta`, whichever way the
    config stores them (transformers 5 `rope_parameters`, or older `rope_theta` + `rope_scaling`)."""
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and params and not isinstance(next(iter(params.values())), dict):
        rope = dict(params)
    else:
        rope = dict(getattr(hf_config, "rope_scaling", None) or {})
    rope.setdefault("rope_theta", getattr(hf_config, "rope_theta", None) or 10000.0)
    rope["rope_type"] = rope.get("rope_type") or rope.get("type") or "default"
    if rope.get("partial_rotary_factor") is None and getattr(hf_config, "partial_rotary_factor", None):
        rope["partial_rotary_factor"] = hf_config.partial_rotary_factor
    return rope


def rope_inverse_frequencies(
    rope: dict[str, Any], rotary_dim: int, max_positions: int
) -> tuple[torch.Tensor, float]:
    """`inv_freq [rotary_dim/2]` and the cos/sin scaling for the config's rope type."""
    base = float(rope["rope_theta"])
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    inv_freq = 1.0 / (base**exponents)
    rope_type = rope["rope_type"]
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / float(rope["factor"]), 1.0
    if rope_type == "llama3":
        return _llama3_inverse_frequencies(inv_freq, rope), 1.0
    if rope_type == "yarn":
        return _yarn_inverse_frequencies(rope, base, rotary_dim, max_positions)
    raise UnsupportedRopeError(
        f"rope_type {rope_type!r} is not supported (supported: default, linear, llama3, yarn)"
    )


def _llama3_inverse_frequencies(inv_freq: torch.Tensor, rope: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth blend between."""
    factor = float(rope["factor"])
    low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old_context = float(rope["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, blended)
    return torch.where(wavelen < old_context / high, inv_freq, scaled)


def _yarn_inverse_frequencies(
    rope: dict[str, Any], base: float, dim: int, max_positions: int
) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, extrapolate high ones, ramp between; scale attention."""
    original = rope["original_max_position_embeddings"]
    factor = rope.get("factor") or max_positions / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = rope.get("attention_factor")
    if attention is None:
        m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rope.get("beta_fast") or 32), correction_dim(rope.get("beta_slow") or 1)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolate = 1 - ramp  # weight of the unscaled frequency
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attention)
