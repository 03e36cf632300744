"""Building blocks every model family shares: RMSNorm, merged projections, gated MLP, rotary
embedding and the self-attention block around the paged `Attention`.

Every numeric op goes through `splitserve.kernels.ops` (Triton on GPU, torch reference on CPU).
The merged projections keep Hugging Face's separate matrices as row blocks of one weight, so
one GEMM serves q/k/v (or gate/up); `load_shard` copies one HF matrix into its rows. Modules with
such sharded parameters answer `shards(param_name)`, which the weight loader uses to check that
every shard was loaded. Families pick and configure these blocks; they hold no family logic.
The projections are the tensor-parallel ones of parallel_layers.py: with N ranks each block holds
1/N of the heads and of the intermediate channels (one rank: all of them).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from splitserve.kernels import ops
from splitserve.kernels.rotary import compute_cos_sin_cache
from splitserve.shared.model.attention import Attention, AttentionMetadata
from splitserve.shared.model.parallel_layers import (MergedColumnParallelLinear, RowParallelLinear, ShardedRMSNorm,
                                                     check_head_split, even_slice, kv_head_slice, kv_replicas)
from splitserve.shared.parallel import state


class UnsupportedRopeError(NotImplementedError):
    """The checkpoint asks for a RoPE scaling type this implementation does not compute."""


class UnsupportedConfigError(ValueError):
    """The checkpoint's config sets an option that this family does not compute (the message names
    the field): refused at load rather than served with different tokens."""


def head_dim_of(hf_config: Any) -> int:
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def num_kv_heads_of(hf_config: Any) -> int:
    return getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads


class RMSNorm(nn.Module):
    """`forward(x)` normalises; `forward(x, residual)` adds first and also returns the sum.

    `one_centered`: the checkpoint stores `w - 1` and the scale is `1 + w` (Gemma)."""

    def __init__(self, hidden_size: int, eps: float, one_centered: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size) if one_centered else torch.ones(hidden_size))
        self.eps = eps
        self.one_centered = one_centered

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        weight = self.weight + 1.0 if self.one_centered else self.weight
        if residual is None:
            return ops.rms_norm(x, weight, self.eps)
        return ops.fused_add_rms_norm(x, residual, weight, self.eps)  # (normed, x + residual)


ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
"""Gate activations of the gated MLPs (`hidden_act` / `hidden_activation` in HF configs)."""


def check_activation(hidden_act: str) -> str:
    if hidden_act not in ACTIVATIONS:
        raise ValueError(f"hidden_act {hidden_act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    return hidden_act


class GatedMLP(nn.Module):
    """SwiGLU / GeGLU: `down(act(gate(x)) * up(x))` with gate and up merged into one GEMM."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool, hidden_act: str) -> None:
        super().__init__()
        self.activation = check_activation(hidden_act)
        channels = even_slice(intermediate_size, "the MLP's intermediate size")
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, {"gate": channels, "up": channels}, bias)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias, "the MLP's intermediate size")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [T, 2I]
        return self.down_proj(ops.act_and_mul(gate_up, self.activation))  # [T, I] -> [T, H]


class RotaryEmbedding(nn.Module):
    """Applies RoPE to the first `rotary_dim` channels of each head (all of them unless the
    checkpoint sets `partial_rotary_factor`)."""

    def __init__(self, head_dim: int, rotary_dim: int, max_positions: int, rope: dict[str, Any]) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        # [max_positions, rotary_dim] rows cos ‖ sin, fp32; not a checkpoint weight.
        self.register_buffer("cos_sin_cache", rope_cos_sin_cache(rope, rotary_dim, max_positions), persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # q [T, Hq, D], k [T, Hkv, D]
        if self.rotary_dim == self.head_dim:
            return ops.rotary_embedding(positions, q, k, self.cos_sin_cache)
        r = self.rotary_dim
        q_rot, k_rot = ops.rotary_embedding(positions, q[..., :r], k[..., :r], self.cos_sin_cache)
        return torch.cat([q_rot, q[..., r:]], dim=-1), torch.cat([k_rot, k[..., r:]], dim=-1)


def rope_parameters(hf_config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """The RoPE settings as one dict with `rope_type` and `rope_theta`, whichever way the
    config stores them (transformers 5 `rope_parameters`, or older `rope_theta` + `rope_scaling`).
    Configs with one RoPE per layer kind (Gemma 3: "sliding_attention" / "full_attention") give
    `layer_type`'s."""
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and layer_type is not None and isinstance(params.get(layer_type), dict):
        rope = dict(params[layer_type])
    elif isinstance(params, dict) and params and not isinstance(next(iter(params.values())), dict):
        rope = dict(params)
    else:
        rope = dict(getattr(hf_config, "rope_scaling", None) or {})
    rope.setdefault("rope_theta", getattr(hf_config, "rope_theta", None) or 10000.0)
    rope["rope_type"] = rope.get("rope_type") or rope.get("type") or "default"
    if rope.get("partial_rotary_factor") is None and getattr(hf_config, "partial_rotary_factor", None):
        rope["partial_rotary_factor"] = hf_config.partial_rotary_factor
    original = getattr(hf_config, "original_max_position_embeddings", None)
    if rope.get("original_max_position_embeddings") is None and original:
        rope["original_max_position_embeddings"] = original
    return rope


def rope_cos_sin_cache(rope: dict[str, Any], rotary_dim: int, max_positions: int) -> torch.Tensor:
    """`[max_positions, rotary_dim]` fp32 rows cos ‖ sin for the config's rope type."""
    if rope["rope_type"] in ("longrope", "su"):  # "su": Phi-3's first name for LongRoPE
        return _longrope_cos_sin_cache(rope, rotary_dim, max_positions)
    inv_freq, attention_scaling = rope_inverse_frequencies(rope, rotary_dim, max_positions)
    return compute_cos_sin_cache(inv_freq, max_positions, attention_scaling)


def _longrope_cos_sin_cache(rope: dict[str, Any], rotary_dim: int, max_positions: int) -> torch.Tensor:
    """LongRoPE (Phi-3 "su"): frequencies divided by per-channel `short_factor` for positions within
    `original_max_position_embeddings`, by `long_factor` beyond, both scaled by
    `sqrt(1 + ln(factor) / ln(original))`. transformers switches the factors by the longest
    position of each forward call, so a prompt that itself passes the original length is rotated
    with the long factors throughout there and per position here; within it the two agree exactly."""
    original = int(rope["original_max_position_embeddings"])
    factor = rope.get("factor") or max_positions / original
    scaling = rope.get("attention_factor")
    if scaling is None:
        scaling = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    base = float(rope["rope_theta"])
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    caches = [
        compute_cos_sin_cache(1.0 / (torch.tensor(rope[key], dtype=torch.float32) * base**exponents),
                              max_positions, scaling)
        for key in ("short_factor", "long_factor")
    ]
    return torch.cat([caches[0][:original], caches[1][original:]])


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
        f"rope_type {rope_type!r} is not supported (supported: default, linear, llama3, yarn, longrope)"
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


class SelfAttention(nn.Module):
    """The attention block: merged q/k/v projection -> optional q/k RMSNorm -> RoPE -> paged
    attention -> output projection. `qk_norm` is "head" (over each head's D channels, Qwen3 and
    Gemma 3), "full" (over the whole projection, OLMo 2) or None."""

    def __init__(
        self,
        cfg: Any,
        layer_idx: int,
        rotary_emb: RotaryEmbedding,
        *,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm: str | None = None,
        one_centered_norm: bool = False,
        sliding_window: int | None = None,
        scale: float | None = None,
        logit_softcap: float | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim = head_dim_of(cfg)
        total_heads, total_kv_heads = cfg.num_attention_heads, num_kv_heads_of(cfg)
        check_head_split(total_heads, total_kv_heads, state.world_size())
        q_rows = even_slice(total_heads * head_dim, "the q projection")
        kv_rows = kv_head_slice(total_kv_heads, head_dim)
        self.num_heads, self.num_kv_heads = q_rows.size // head_dim, kv_rows.size // head_dim  # this rank's
        self.split_sizes = [q_rows.size, kv_rows.size, kv_rows.size]
        self.qkv_proj = MergedColumnParallelLinear(cfg.hidden_size, {"q": q_rows, "k": kv_rows, "v": kv_rows}, qkv_bias)
        self.o_proj = RowParallelLinear(q_rows.full, cfg.hidden_size, o_bias, "the q projection")
        self.qk_norm = qk_norm
        if qk_norm == "head":
            self.q_norm = RMSNorm(head_dim, cfg.rms_norm_eps, one_centered_norm)
            self.k_norm = RMSNorm(head_dim, cfg.rms_norm_eps, one_centered_norm)
        elif qk_norm == "full":  # over all heads, which other ranks hold part of
            if one_centered_norm:
                raise ValueError("a one-centered norm over the whole projection is not implemented")
            self.q_norm = ShardedRMSNorm(q_rows, cfg.rms_norm_eps)
            self.k_norm = ShardedRMSNorm(kv_rows, cfg.rms_norm_eps, kv_replicas(total_kv_heads))
        self.rotary_emb = rotary_emb  # shared by the layers of one rope kind
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, layer_idx, sliding_window,
                              scale=scale, logit_softcap=logit_softcap)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.split_sizes, dim=-1)  # [T, Hq*D], [T, Hkv*D] x 2
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        num_tokens = x.shape[0]
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":  # each head over its D channels, read from the qkv views in place
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, attn))  # [T, Hq*D] -> [T, H]


def rotary_embedding_for(cfg: Any, rope: dict[str, Any] | None = None, *, partial: bool = False) -> RotaryEmbedding:
    """The config's RoPE (or the given `rope` settings) over `head_dim` channels, or over the first
    `partial_rotary_factor` of them in a family that rotates part of each head (`partial`, Phi-3).
    The others' transformers implementations rotate the whole head whatever the factor says (or fail
    under a scaled RoPE), so a factor below 1 is refused there rather than guessed at."""
    head_dim = head_dim_of(cfg)
    rope = rope or rope_parameters(cfg)
    factor = float(rope.get("partial_rotary_factor") or 1.0)
    if factor != 1.0 and not partial:
        raise UnsupportedConfigError(
            f"partial_rotary_factor {factor} is not supported by {type(cfg).__name__} (its heads rotate whole)"
        )
    return RotaryEmbedding(head_dim, int(head_dim * factor), cfg.max_position_embeddings, rope)
