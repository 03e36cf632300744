"""What every family's top-level model shares: the head, the KV-cache binding, weight loading.

    model = SomeFamilyForCausalLM(hf_config)
    model.bind_kv_cache(kv_cache)   # [num_blocks, num_layers, 2, block_size, Hkv, D]
    hidden = model(input_ids, positions, attn_metadata)   # [T, H]
    logits = model.compute_logits(hidden[rows])          # [N, V] model dtype
    model.load_weights(named_tensors)                     # Hugging Face names

A family subclasses `CausalLM`, builds `self.model` (whose `forward(input_ids, positions, attn)`
returns the final hidden states and whose `embed_tokens` the head may tie to) and overrides
`checkpoint_name` where its checkpoint names differ from its modules'.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from splitserve.shared.model.attention import Attention, AttentionMetadata
from splitserve.shared.model.parallel_layers import ParallelLMHead
from splitserve.shared.model.weights import LLAMA_MERGED, load_checkpoint_weights, merged_name


class CausalLM(nn.Module):
    final_logit_softcap: float | None = None
    """Gemma 2: logits become `cap * tanh(logits / cap)`."""

    def __init__(self, hf_config: Any, model: nn.Module) -> None:
        super().__init__()
        self.config = hf_config
        self.model = model
        self.lm_head = ParallelLMHead(hf_config.vocab_size, hf_config.hidden_size)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        """`input_ids [T]`, `positions [T]` -> final hidden states `[T, H]`."""
        return self.model(input_ids, positions, attn)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`hidden [N, H]` (only the rows to sample) -> `[N, V]` in the model's dtype; the sampler
        upcasts to float32 where it computes more than an argmax. A collective under tensor
        parallelism: every rank calls it with the same rows and gets the full logits."""
        logits = self.lm_head(hidden)
        if self.final_logit_softcap is not None:
            logits = torch.tanh(logits / self.final_logit_softcap) * self.final_logit_softcap
        return logits

    def attention_layers(self) -> list[Attention]:
        return [m for m in self.modules() if isinstance(m, Attention)]

    @property
    def uniform_sliding_window(self) -> int | None:
        """The window when every attention layer slides by the same one (the engine then frees the
        blocks it slid past), else None."""
        windows = {layer.sliding_window for layer in self.attention_layers()}
        return windows.pop() if len(windows) == 1 else None

    def kv_layer_groups(self) -> list[tuple[int | None, list[int]]]:
        """(window or None, attention layer indices) of each group of layers that attend alike:
        full attention first, then one group per window, smallest first (shared/kv/layer_groups.py).
        A model with one group keeps one pool of all layers."""
        by_window: dict[int | None, list[int]] = {}
        for i, layer in enumerate(self.attention_layers()):
            by_window.setdefault(layer.sliding_window, []).append(i)
        return sorted(by_window.items(), key=lambda item: -1 if item[0] is None else item[0])

    def bind_kv_cache(self, kv_cache: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Give every attention layer its views of the pool `[num_blocks, num_layers, 2, block_size, Hkv, D]`,
        or of its group's pool given one per `kv_layer_groups()` entry (`num_layers` the group's)."""
        layers = self.attention_layers()
        pools = [kv_cache] if isinstance(kv_cache, torch.Tensor) else list(kv_cache)
        groups = [list(range(len(layers)))] if len(pools) == 1 else [idx for _, idx in self.kv_layer_groups()]
        if len(pools) != len(groups):
            raise ValueError(f"{len(pools)} KV pools for the model's {len(groups)} layer groups")
        for group, (pool, indices) in enumerate(zip(pools, groups)):
            if pool.shape[1] != len(indices):
                raise ValueError(f"kv_cache has {pool.shape[1]} layers, the model {len(indices)}")
            for index, layer_idx in enumerate(indices):
                layers[layer_idx].bind_kv_cache(pool, index if len(pools) > 1 else None, group)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors into the parameters (casting to their dtype/device).

        Raises `WeightLoadError` naming any unknown, misshapen or missing weight."""
        load_checkpoint_weights(self, weights, self.checkpoint_name)

    def checkpoint_name(self, hf_name: str) -> tuple[str, Hashable | None] | None:
        """Our parameter and shard for a checkpoint tensor, None to skip it (see `weights.py`)."""
        if hf_name.endswith("rotary_emb.inv_freq") or (self.tie_word_embeddings and hf_name == "lm_head.weight"):
            return None
        return merged_name(hf_name, LLAMA_MERGED)
