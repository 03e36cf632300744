"""OLMo 2: the Llama layout with the norms moved after each block ("post-norm").

    embed -> N x [attention -> RMSNorm -> + -> MLP -> RMSNorm -> +] -> RMSNorm -> head

Its q/k RMSNorm covers the whole q (and k) projection, all heads together, before RoPE.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from splitserve.shared.model.attention import AttentionMetadata
from splitserve.shared.model.causal_lm import CausalLM
from splitserve.shared.model.parallel_layers import VocabParallelEmbedding
from splitserve.shared.model.layers import RMSNorm, SelfAttention, rotary_embedding_for
from splitserve.shared.model.llama import dense_mlp


class Olmo2DecoderLayer(nn.Module):
    def __init__(self, cfg: Any, self_attn: SelfAttention, mlp: nn.Module) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        hidden = hidden + self.post_attention_layernorm(self.self_attn(positions, hidden, attn))
        return hidden + self.post_feedforward_layernorm(self.mlp(hidden))


class Olmo2Model(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.rotary_emb = rotary_embedding_for(cfg)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        bias = bool(getattr(cfg, "attention_bias", False))
        self.layers = nn.ModuleList(
            Olmo2DecoderLayer(cfg, SelfAttention(cfg, i, self.rotary_emb, qkv_bias=bias, o_bias=bias, qk_norm="full"),
                              dense_mlp(cfg, i))
            for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # [T, H]
        for layer in self.layers:
            hidden = layer(positions, hidden, attn)
        return self.norm(hidden)


class Olmo2ForCausalLM(CausalLM):
    def __init__(self, hf_config: Any) -> None:
        super().__init__(hf_config, Olmo2Model(hf_config))


ARCHITECTURES = {"Olmo2ForCausalLM": Olmo2ForCausalLM}
