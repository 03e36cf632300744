"""Gemma 2 and Gemma 3 (text) in one file.

    embed * sqrt(H) -> N x [norm -> attention -> norm -> + -> norm -> GeGLU MLP -> norm -> +] -> norm -> head

What sets them apart from the Llama family, each read from the config:
- every RMSNorm scales by `1 + w` (the checkpoint stores `w - 1`); "sandwich" norms before and after
  both the attention and the MLP;
- GeGLU MLP (`hidden_activation`, gelu with the tanh approximation);
- attention scale `query_pre_attn_scalar ** -0.5` instead of `head_dim ** -0.5`;
- `layer_types` interleaves sliding-window ("sliding_attention") and global layers;
- logits soft-capped by `final_logit_softcapping` (when set);
- Gemma 2: attention scores soft-capped by `attn_logit_softcapping`;
- Gemma 3: per-head q/k RMSNorm and a RoPE per layer kind (`rope_parameters["sliding_attention"]`,
  the local base, and `["full_attention"]`; older configs: `rope_local_base_freq`). Its config
  carries `attn_logit_softcapping` too, but transformers' Gemma 3 attention never applies it, nor here.

`use_bidirectional_attention` (the encoder variants, e.g. EmbeddingGemma) is refused at load: every
layer here attends causally over the paged cache.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from splitserve.shared.model.attention import AttentionMetadata
from splitserve.shared.model.causal_lm import CausalLM
from splitserve.shared.model.parallel_layers import VocabParallelEmbedding
from splitserve.shared.model.layers import (GatedMLP, RMSNorm, SelfAttention, UnsupportedConfigError, rope_parameters,
                                            rotary_embedding_for)


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg: Any, self_attn: SelfAttention) -> None:
        super().__init__()
        hidden, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(hidden, eps, one_centered=True)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(hidden, eps, one_centered=True)
        self.pre_feedforward_layernorm = RMSNorm(hidden, eps, one_centered=True)
        self.mlp = GatedMLP(hidden, cfg.intermediate_size, False, _activation(cfg))
        self.post_feedforward_layernorm = RMSNorm(hidden, eps, one_centered=True)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        delta = self.post_attention_layernorm(self.self_attn(positions, self.input_layernorm(hidden), attn))
        normed, residual = self.pre_feedforward_layernorm(delta, hidden)  # residual = hidden + delta
        return residual + self.post_feedforward_layernorm(self.mlp(normed))


def _activation(cfg: Any) -> str:
    return getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", "gelu_pytorch_tanh")


def _check_causal(cfg: Any) -> None:
    if getattr(cfg, "use_bidirectional_attention", False):
        raise UnsupportedConfigError("use_bidirectional_attention=True is not supported: attention here is causal")


def _layer_types(cfg: Any) -> list[str]:
    return list(getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers)


def _rope_of(cfg: Any, layer_type: str) -> dict[str, Any]:
    rope = rope_parameters(cfg, layer_type)
    per_kind = getattr(cfg, "rope_parameters", None)
    has_own = isinstance(per_kind, dict) and isinstance(per_kind.get(layer_type), dict)
    local_base = getattr(cfg, "rope_local_base_freq", None)
    if layer_type == "sliding_attention" and local_base and not has_own:
        rope = {**rope, "rope_theta": local_base}
    return rope


class GemmaModel(nn.Module):
    def __init__(self, cfg: Any, qk_norm: str | None, attn_softcap: bool) -> None:
        super().__init__()
        _check_causal(cfg)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.hidden_size = cfg.hidden_size
        kinds = _layer_types(cfg)
        self.rotary_embs = nn.ModuleDict({kind: rotary_embedding_for(cfg, _rope_of(cfg, kind)) for kind in set(kinds)})
        window = getattr(cfg, "sliding_window", None)
        options = dict(
            qkv_bias=bool(getattr(cfg, "attention_bias", False)),
            o_bias=bool(getattr(cfg, "attention_bias", False)),
            qk_norm=qk_norm,
            one_centered_norm=True,
            scale=float(cfg.query_pre_attn_scalar) ** -0.5,
            logit_softcap=getattr(cfg, "attn_logit_softcapping", None) if attn_softcap else None,
        )
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(cfg, SelfAttention(cfg, i, self.rotary_embs[kind], **options,
                                                 sliding_window=window if kind == "sliding_attention" else None))
            for i, kind in enumerate(kinds)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, one_centered=True)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # [T, H]
        # transformers rounds the scale to the model dtype before multiplying
        hidden = hidden * torch.tensor(self.hidden_size**0.5, dtype=hidden.dtype)
        for layer in self.layers:
            hidden = layer(positions, hidden, attn)
        return self.norm(hidden)


class GemmaForCausalLM(CausalLM):
    def __init__(self, hf_config: Any, qk_norm: str | None, attn_softcap: bool) -> None:
        super().__init__(hf_config, GemmaModel(hf_config, qk_norm, attn_softcap))
        self.final_logit_softcap = getattr(hf_config, "final_logit_softcapping", None)


ARCHITECTURES = {
    "Gemma2ForCausalLM": lambda cfg: GemmaForCausalLM(cfg, qk_norm=None, attn_softcap=True),
    "Gemma3ForCausalLM": lambda cfg: GemmaForCausalLM(cfg, qk_norm="head", attn_softcap=False),
}
