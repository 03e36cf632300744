"""The Llama family in one file: Llama 2/3, Mistral, Qwen2/2.5 and Qwen3.

    embed -> N x [RMSNorm -> attention (RoPE, paged KV) -> + -> RMSNorm -> MLP -> +] -> RMSNorm -> head

The variants differ only in the attention options each reads from its config: biases on the
q/k/v projections (Qwen2), per-head RMSNorm of q and k before RoPE (Qwen3), a sliding attention
window per layer (Mistral on every layer; Qwen2/3 where `layer_types` says "sliding_attention",
which transformers derives from `use_sliding_window` and `max_window_layers`). The pre-norm decoder
layer and the model take the MLP as a part, so the mixture-of-experts families (`mixtral.py`,
`qwen_moe.py`) reuse them with a sparse MLP.

Tokens of all requests in a step are packed along one axis T; `AttentionMetadata` says which
rows belong to which request. Module names follow Hugging Face's so checkpoint names map
directly, except that q/k/v and gate/up are merged into one weight each.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from splitserve.shared.model.attention import AttentionMetadata
from splitserve.shared.model.causal_lm import CausalLM
from splitserve.shared.model.parallel_layers import VocabParallelEmbedding
from splitserve.shared.model.layers import GatedMLP, RMSNorm, RotaryEmbedding, SelfAttention, rotary_embedding_for

MakeMLP = Callable[[Any, int], nn.Module]
"""(hf_config, layer index) -> the layer's MLP."""


def dense_mlp(cfg: Any, layer_idx: int) -> nn.Module:
    return GatedMLP(cfg.hidden_size, cfg.intermediate_size, bool(getattr(cfg, "mlp_bias", False)),
                    getattr(cfg, "hidden_act", "silu"))


def windows_from_layer_types(cfg: Any) -> list[int | None]:
    """Per-layer window where `layer_types` marks "sliding_attention" layers (transformers 5 sets
    `sliding_window` to None unless `use_sliding_window`, and marks layers from `max_window_layers` on)."""
    layer_types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    window = getattr(cfg, "sliding_window", None) or None
    if hasattr(cfg, "use_sliding_window") and not cfg.use_sliding_window:
        window = None
    return [window if kind == "sliding_attention" else None for kind in layer_types]


AttentionOptions = Callable[[Any], list[dict[str, Any]]]
"""hf_config -> `SelfAttention` keyword arguments of each layer."""


def llama_attention(cfg: Any) -> list[dict[str, Any]]:
    bias = bool(getattr(cfg, "attention_bias", False))
    return [dict(qkv_bias=bias, o_bias=bias)] * cfg.num_hidden_layers


def mistral_attention(cfg: Any) -> list[dict[str, Any]]:
    return [dict(sliding_window=getattr(cfg, "sliding_window", None))] * cfg.num_hidden_layers  # every layer


def qwen2_attention(cfg: Any) -> list[dict[str, Any]]:
    return [dict(qkv_bias=True, sliding_window=w) for w in windows_from_layer_types(cfg)]


def qwen3_attention(cfg: Any) -> list[dict[str, Any]]:
    bias = bool(getattr(cfg, "attention_bias", False))
    return [dict(qkv_bias=bias, o_bias=bias, qk_norm="head", sliding_window=w) for w in windows_from_layer_types(cfg)]


class PreNormDecoderLayer(nn.Module):
    def __init__(self, cfg: Any, self_attn: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        attn: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The residual add is fused into the next norm: `hidden` is this block's output delta,
        # `residual` the running sum before it.
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, attn)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: Any, attention_options: AttentionOptions, make_mlp: MakeMLP = dense_mlp,
                 partial_rotary: bool = False) -> None:
        """`partial_rotary`: RoPE over the first `partial_rotary_factor` of each head (Phi-3)."""
        super().__init__()
        self.rotary_emb: RotaryEmbedding = rotary_embedding_for(cfg, partial=partial_rotary)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            PreNormDecoderLayer(cfg, SelfAttention(cfg, i, self.rotary_emb, **options), make_mlp(cfg, i))
            for i, options in enumerate(attention_options(cfg))
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # [T] -> [T, H]
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, attn)
        hidden, _ = self.norm(hidden, residual)
        return hidden  # [T, H]


class LlamaForCausalLM(CausalLM):
    def __init__(self, hf_config: Any, attention_options: AttentionOptions = llama_attention,
                 partial_rotary: bool = False) -> None:
        super().__init__(hf_config, LlamaModel(hf_config, attention_options, partial_rotary=partial_rotary))


ARCHITECTURES: dict[str, Callable[[Any], nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": lambda cfg: LlamaForCausalLM(cfg, mistral_attention),
    "Qwen2ForCausalLM": lambda cfg: LlamaForCausalLM(cfg, qwen2_attention),
    "Qwen3ForCausalLM": lambda cfg: LlamaForCausalLM(cfg, qwen3_attention),
}
