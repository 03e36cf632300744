"""The Llama family in one file: Llama 2/3, Mistral, Qwen2/2.5 and Qwen3.

    embed -> N x [RMSNorm -> attention (RoPE, paged KV) -> + -> RMSNorm -> SwiGLU MLP -> +] -> RMSNorm -> head

The variants differ only in `LlamaFlags` (read from the config by `registry.py`): biases on the
q/k/v projections (Qwen2), per-head RMSNorm of q and k before RoPE (Qwen3), a sliding attention
window per layer (Mistral, Qwen2/3 with `use_sliding_window`).

Tokens of all requests in a step are packed along one axis T; `AttentionMetadata` says which
rows belong to which request. Module names follow Hugging Face's so checkpoint names map
directly, except that q/k/v and gate/up are merged into one weight each.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from splitserve.shared.model.attention import Attention, AttentionMetadata
from splitserve.shared.model.layers import GatedMLP, MergedLinear, RMSNorm, RotaryEmbedding, rope_parameters


class WeightLoadError(ValueError):
    """Checkpoint tensors do not match the model: unknown, missing or misshapen weights."""


@dataclass(frozen=True)
class LlamaFlags:
    """What distinguishes one Llama-family architecture from another."""

    qkv_bias: bool
    o_proj_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_windows: tuple[int | None, ...]
    """Attention window of each layer, None for full attention."""


def head_dim_of(hf_config: Any) -> int:
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


class LlamaAttention(nn.Module):
    def __init__(self, cfg: Any, flags: LlamaFlags, layer_idx: int, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = head_dim_of(cfg)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.split_sizes = [q_size, kv_size, kv_size]
        self.qkv_proj = MergedLinear(cfg.hidden_size, {"q": q_size, "k": kv_size, "v": kv_size}, flags.qkv_bias)
        self.o_proj = nn.Linear(q_size, cfg.hidden_size, bias=flags.o_proj_bias)
        if flags.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.qk_norm = flags.qk_norm
        self.rotary_emb = rotary_emb  # shared by all layers
        self.attn = Attention(
            self.num_heads, self.num_kv_heads, self.head_dim, layer_idx, flags.sliding_windows[layer_idx]
        )

    def forward(self, positions: torch.Tensor, x: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.split_sizes, dim=-1)  # [T, Hq*D], [T, Hkv*D] x 2
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm:  # Qwen3: RMSNorm over each head's D channels, before RoPE
            q = self.q_norm(q.reshape(-1, self.head_dim)).view_as(q)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view_as(k)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, attn))  # [T, Hq*D] -> [T, H]


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: Any, flags: LlamaFlags, layer_idx: int, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, flags, layer_idx, rotary_emb)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, flags.mlp_bias, getattr(cfg, "hidden_act", "silu"))

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
    def __init__(self, cfg: Any, flags: LlamaFlags) -> None:
        super().__init__()
        head_dim = head_dim_of(cfg)
        rope = rope_parameters(cfg)
        rotary_dim = int(head_dim * float(rope.get("partial_rotary_factor") or 1.0))
        self.rotary_emb = RotaryEmbedding(head_dim, rotary_dim, cfg.max_position_embeddings, rope)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, flags, i, self.rotary_emb) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # [T] -> [T, H]
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, attn)
        hidden, _ = self.norm(hidden, residual)
        return hidden  # [T, H]


# Hugging Face projection name -> (our merged projection, its shard)
_MERGED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"),
    "up_proj": ("gate_up_proj", "up"),
}


class LlamaForCausalLM(nn.Module):
    def __init__(self, hf_config: Any, flags: LlamaFlags) -> None:
        super().__init__()
        self.config = hf_config
        self.flags = flags
        self.model = LlamaModel(hf_config, flags)
        self.lm_head = nn.Linear(hf_config.hidden_size, hf_config.vocab_size, bias=False)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        """`input_ids [T]`, `positions [T]` -> final hidden states `[T, H]`."""
        return self.model(input_ids, positions, attn)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`hidden [N, H]` (only the rows to sample) -> `[N, V]` in the model's dtype; the sampler
        upcasts to float32 where it computes more than an argmax."""
        return self.lm_head(hidden)

    def bind_kv_cache(self, kv_cache: torch.Tensor) -> None:
        """Give every layer its views of the pool `[num_blocks, num_layers, 2, block_size, Hkv, D]`."""
        if kv_cache.shape[1] != len(self.model.layers):
            raise ValueError(f"kv_cache has {kv_cache.shape[1]} layers, the model {len(self.model.layers)}")
        for layer in self.model.layers:
            layer.self_attn.attn.bind_kv_cache(kv_cache)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors into the parameters (casting to their dtype/device).

        Raises `WeightLoadError` naming any unknown, misshapen or missing weight."""
        params = dict(self.named_parameters())  # a tied lm_head.weight appears once, as embed_tokens
        pending = self._expected_weights(params)
        for hf_name, tensor in weights:
            if hf_name.endswith("rotary_emb.inv_freq") or (self.tie_word_embeddings and hf_name == "lm_head.weight"):
                continue
            name, shard = self._our_name(hf_name)
            if name not in params:
                raise WeightLoadError(f"checkpoint weight {hf_name!r} has no counterpart in {type(self).__name__}")
            self._copy_weight(params[name], name, shard, hf_name, tensor)
            pending.discard((name, shard))
        if pending:
            missing = sorted(f"{n}[{s}]" if s else n for n, s in pending)
            raise WeightLoadError(f"checkpoint is missing {len(missing)} weights: {', '.join(missing[:20])}")

    @staticmethod
    def _our_name(hf_name: str) -> tuple[str, str | None]:
        """'model.layers.0.self_attn.k_proj.bias' -> ('model.layers.0.self_attn.qkv_proj.bias', 'k')"""
        parts = hf_name.split(".")
        if len(parts) >= 2 and parts[-2] in _MERGED:
            merged, shard = _MERGED[parts[-2]]
            return ".".join([*parts[:-2], merged, parts[-1]]), shard
        return hf_name, None

    def _expected_weights(self, params: dict[str, nn.Parameter]) -> set[tuple[str, str | None]]:
        modules = dict(self.named_modules())
        expected: set[tuple[str, str | None]] = set()
        for name in params:
            module = modules[name.rpartition(".")[0]]
            shards = module.shard_offsets if isinstance(module, MergedLinear) else {None: None}
            expected.update((name, shard) for shard in shards)
        return expected

    def _copy_weight(
        self, param: nn.Parameter, name: str, shard: str | None, hf_name: str, tensor: torch.Tensor
    ) -> None:
        with torch.no_grad():
            if shard is not None:
                module = self.get_submodule(name.rpartition(".")[0])
                try:
                    module.load_shard(name.rpartition(".")[2], shard, tensor)
                except ValueError as exc:
                    raise WeightLoadError(f"checkpoint weight {hf_name!r}: {exc}") from exc
                return
            if param.shape != tensor.shape:
                raise WeightLoadError(
                    f"checkpoint weight {hf_name!r} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}"
                )
            param.copy_(tensor)
