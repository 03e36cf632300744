"""Copy Hugging Face-named checkpoint tensors into a model's parameters, checking every one.

    load_checkpoint_weights(model, weights, checkpoint_name)

`checkpoint_name(hf_name)` is the family's mapping: the name of our parameter and the shard of it
that the tensor fills (None for the whole parameter), or None to skip the tensor. A module whose
parameters are built from several checkpoint tensors (merged q/k/v, stacked experts) answers
`shards(param_name)` and `load_shard(param_name, shard, tensor)`; a module that slices a whole
checkpoint tensor for its tensor-parallel rank answers `load_shard(param_name, None, tensor)`. The
loader knows no more of them.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable

import torch
from torch import nn

CheckpointName = Callable[[str], "tuple[str, Hashable | None] | None"]


class WeightLoadError(ValueError):
    """Checkpoint tensors do not match the model: unknown, missing or misshapen weights."""


def load_checkpoint_weights(
    model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], checkpoint_name: CheckpointName
) -> None:
    """Raises `WeightLoadError` naming any unknown, misshapen or missing weight."""
    params = dict(model.named_parameters())  # a tied lm_head.weight appears once, as embed_tokens
    pending = _expected_weights(model, params)
    for hf_name, tensor in weights:
        mapped = checkpoint_name(hf_name)
        if mapped is None:
            continue
        name, shard = mapped
        if name not in params:
            raise WeightLoadError(f"checkpoint weight {hf_name!r} has no counterpart in {type(model).__name__}")
        _copy_weight(model, params[name], name, shard, hf_name, tensor)
        pending -= {(name, shard)} if shard is not None else {p for p in pending if p[0] == name}
    if pending:
        missing = sorted(f"{n}[{s}]" if s is not None else n for n, s in pending)
        raise WeightLoadError(f"checkpoint is missing {len(missing)} weights: {', '.join(missing[:20])}")


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, param_name = name.rpartition(".")
    return model.get_submodule(module_name), param_name


def _expected_weights(model: nn.Module, params: dict[str, nn.Parameter]) -> set[tuple[str, Hashable | None]]:
    expected: set[tuple[str, Hashable | None]] = set()
    for name in params:
        module, param_name = _owner(model, name)
        shards = module.shards(param_name) if hasattr(module, "shards") else [None]
        expected.update((name, shard) for shard in shards)
    return expected


def _copy_weight(
    model: nn.Module, param: nn.Parameter, name: str, shard: Hashable | None, hf_name: str, tensor: torch.Tensor
) -> None:
    with torch.no_grad():
        module, param_name = _owner(model, name)
        if hasattr(module, "load_shard"):  # its own slicing: merged, stacked or tensor-parallel parameters
            try:
                module.load_shard(param_name, shard, tensor)
            except ValueError as exc:
                raise WeightLoadError(f"checkpoint weight {hf_name!r}: {exc}") from exc
            return
        if param.shape != tensor.shape:
            raise WeightLoadError(
                f"checkpoint weight {hf_name!r} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}"
            )
        param.copy_(tensor)


def merged_name(hf_name: str, merged: dict[str, tuple[str, str]]) -> tuple[str, str | None]:
    """'model.layers.0.self_attn.k_proj.bias' -> ('model.layers.0.self_attn.qkv_proj.bias', 'k') for
    `merged` mapping a checkpoint projection name to (our merged projection, its shard)."""
    parts = hf_name.split(".")
    if len(parts) >= 2 and parts[-2] in merged:
        target, shard = merged[parts[-2]]
        return ".".join([*parts[:-2], target, parts[-1]]), shard
    return hf_name, None


LLAMA_MERGED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"),
    "up_proj": ("gate_up_proj", "up"),
}
"""Hugging Face projection name -> (our merged projection, its shard), as most families name them."""
