"""Qwen2-MoE and Qwen3-MoE: the Qwen2 / Qwen3 attention with a sparse mixture-of-experts MLP.

    embed -> N x [RMSNorm -> attention -> + -> RMSNorm -> MoE (or dense) MLP -> +] -> RMSNorm -> head

Attention: Qwen2-MoE's q/k/v biases follow `qkv_bias` (Qwen2's are always on) and its windows
`layer_types`; Qwen3-MoE has no `layer_types`: its `sliding_window` (None unless
`use_sliding_window`) applies to every layer, as in Mistral.
Layer i is sparse unless it is in `mlp_only_layers` or `(i + 1) % decoder_sparse_step != 0`.
Routing: softmax over `num_experts`, the top `num_experts_per_tok`, renormalised when
`norm_topk_prob`. Qwen2-MoE adds a shared expert of `shared_expert_intermediate_size`, gated by
`sigmoid(shared_expert_gate(x))`. Checkpoints name experts `mlp.experts.{e}.{gate,up,down}_proj`.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from torch import nn

from splitserve.shared.model.causal_lm import CausalLM
from splitserve.shared.model.llama import AttentionOptions, LlamaModel, dense_mlp, qwen2_attention, qwen3_attention
from splitserve.shared.model.moe import SparseMoE, expert_name

_EXPERT_PROJECTIONS = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


def qwen2_moe_attention(cfg: Any) -> list[dict[str, Any]]:
    bias = bool(getattr(cfg, "qkv_bias", True))
    return [dict(options, qkv_bias=bias) for options in qwen2_attention(cfg)]


def qwen3_moe_attention(cfg: Any) -> list[dict[str, Any]]:
    window = getattr(cfg, "sliding_window", None) or None
    return [dict(options, sliding_window=window) for options in qwen3_attention(cfg)]


def qwen_moe_mlp(cfg: Any, layer_idx: int) -> nn.Module:
    sparse = layer_idx not in (getattr(cfg, "mlp_only_layers", None) or []) and cfg.num_experts > 0 and (
        (layer_idx + 1) % getattr(cfg, "decoder_sparse_step", 1) == 0
    )
    if not sparse:
        return dense_mlp(cfg, layer_idx)
    return SparseMoE(
        cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size,
        renormalize=bool(getattr(cfg, "norm_topk_prob", False)), hidden_act=cfg.hidden_act,
        shared_intermediate_size=getattr(cfg, "shared_expert_intermediate_size", 0) or 0,
    )


class QwenMoeForCausalLM(CausalLM):
    def __init__(self, hf_config: Any, attention_options: AttentionOptions) -> None:
        super().__init__(hf_config, LlamaModel(hf_config, attention_options, qwen_moe_mlp))

    def checkpoint_name(self, hf_name: str) -> tuple[str, Hashable | None] | None:
        if ".mlp.shared_expert" in hf_name and not getattr(self.config, "shared_expert_intermediate_size", 0):
            return None  # transformers still saves a shared expert of 0 channels: its output is zero
        return expert_name(hf_name, _EXPERT_PROJECTIONS) or super().checkpoint_name(hf_name)


ARCHITECTURES = {
    "Qwen2MoeForCausalLM": lambda cfg: QwenMoeForCausalLM(cfg, qwen2_moe_attention),
    "Qwen3MoeForCausalLM": lambda cfg: QwenMoeForCausalLM(cfg, qwen3_moe_attention),
}
