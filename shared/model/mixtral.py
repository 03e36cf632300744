"""Mixtral: the Mistral attention (sliding window on every layer when the config sets one) with a
sparse mixture-of-experts MLP on every layer.

Routing: softmax over `num_local_experts`, the top `num_experts_per_tok`, always renormalised.
Checkpoints name the block `block_sparse_moe` (ours: `mlp`) and each expert's projections
`w1` (gate), `w3` (up), `w2` (down).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from torch import nn

from splitserve.shared.model.causal_lm import CausalLM
from splitserve.shared.model.llama import LlamaModel, mistral_attention
from splitserve.shared.model.moe import SparseMoE, expert_name

_EXPERT_PROJECTIONS = {"w1": "gate", "w3": "up", "w2": "down"}


def mixtral_mlp(cfg: Any, layer_idx: int) -> nn.Module:
    return SparseMoE(cfg.hidden_size, cfg.num_local_experts, cfg.num_experts_per_tok, cfg.intermediate_size,
                     renormalize=True, hidden_act=cfg.hidden_act)


class MixtralForCausalLM(CausalLM):
    def __init__(self, hf_config: Any) -> None:
        super().__init__(hf_config, LlamaModel(hf_config, mistral_attention, mixtral_mlp))

    def checkpoint_name(self, hf_name: str) -> tuple[str, Hashable | None] | None:
        hf_name = hf_name.replace(".block_sparse_moe.", ".mlp.")
        return expert_name(hf_name, _EXPERT_PROJECTIONS) or super().checkpoint_name(hf_name)


ARCHITECTURES = {"MixtralForCausalLM": MixtralForCausalLM}
