"""Phi-3 / Phi-4-mini: the Llama layout whose checkpoints already fuse q/k/v (`qkv_proj`) and
gate/up (`gate_up_proj`) into one matrix each, copied whole into our merged projections; RoPE
may be LongRoPE ("longrope", formerly "su": `layers.rope_cos_sin_cache`) and partial
(`partial_rotary_factor`); `sliding_window`, when set, applies to every layer.
"""

from __future__ import annotations

from typing import Any

from splitserve.shared.model.llama import LlamaForCausalLM


def phi3_attention(cfg: Any) -> list[dict[str, Any]]:
    return [dict(sliding_window=getattr(cfg, "sliding_window", None))] * cfg.num_hidden_layers


ARCHITECTURES = {"Phi3ForCausalLM": lambda cfg: LlamaForCausalLM(cfg, phi3_attention, partial_rotary=True)}
