"""Load a Hugging Face checkpoint directory into our model implementation.

    load_model(dir, dtype, device) -> (model, hf_config)

The model is built directly on the target device in the target dtype, then the safetensors
files are streamed in one tensor at a time (each read straight to the device and cast as it is
copied), so the checkpoint is never held in memory twice. `load_format="dummy"` skips the
files and draws seeded random weights from `config.json` alone, for benchmarks.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from splitserve.shared.model.layers import head_dim_of, num_kv_heads_of
from splitserve.shared.model.registry import resolve_architecture

SAFETENSORS_INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """The checkpoint directory is missing, incomplete or unreadable; the message names the file."""


@dataclass(frozen=True)
class ModelInfo:
    """What the engine needs to size the KV pool and stop generation."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]


def load_hf_config(model_dir: str) -> Any:
    """The checkpoint's `config.json` as a transformers config object."""
    if not os.path.isdir(model_dir):
        raise CheckpointError(f"model directory does not exist: {model_dir}")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise CheckpointError(f"config.json not found in model directory {model_dir}")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"cannot read {os.path.join(model_dir, 'config.json')}: {exc}") from exc


def load_model(
    model_dir: str,
    dtype: torch.dtype,
    device: torch.device | str,
    load_format: str = "auto",
    seed: int = 0,
) -> tuple[nn.Module, Any]:
    """Build the model for `model_dir` on `device` in `dtype`, with weights from its
    safetensors files ("auto") or seeded random ones ("dummy")."""
    if load_format not in ("auto", "dummy"):
        raise CheckpointError(f"load_format must be 'auto' or 'dummy', got {load_format!r}")
    hf_config = load_hf_config(model_dir)
    build_model = resolve_architecture(hf_config)
    files = [] if load_format == "dummy" else safetensors_files(model_dir)
    device = torch.device(device)
    with _default_dtype(dtype), torch.device(device):
        model = build_model(hf_config)
    if load_format == "dummy":
        init_dummy_weights(model, std=float(getattr(hf_config, "initializer_range", 0.02)), seed=seed)
    else:
        model.load_weights(iter_safetensors(files, device))
    return model.eval(), hf_config


def safetensors_files(model_dir: str) -> list[str]:
    """The checkpoint's weight files: those named by the shard index if there is one, else all *.safetensors."""
    index_path = os.path.join(model_dir, SAFETENSORS_INDEX)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        missing = [n for n in names if not os.path.isfile(os.path.join(model_dir, n))]
        if missing:
            raise CheckpointError(f"{SAFETENSORS_INDEX} in {model_dir} names missing shard files: {', '.join(missing)}")
    else:
        names = sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors"))
    if not names:
        raise CheckpointError(f"no *.safetensors weight files in model directory {model_dir}")
    return [os.path.join(model_dir, n) for n in names]


def iter_safetensors(files: list[str], device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of `files`, each read directly onto `device`."""
    from safetensors import safe_open

    for path in files:
        with safe_open(path, framework="pt", device=str(device)) as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


@torch.no_grad()
def init_dummy_weights(model: nn.Module, std: float, seed: int) -> None:
    """Random weights for benchmarks: matrices ~ normal(0, std), norms 1, biases 0."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            param.normal_(0.0, std, generator=generator)


def model_info(hf_config: Any, model_dir: str | None = None) -> ModelInfo:
    """Shapes and stop tokens of a checkpoint; `model_dir` adds generation_config.json's EOS ids."""
    eos_ids = _as_id_list(getattr(hf_config, "eos_token_id", None))
    if model_dir is not None:
        gen_path = os.path.join(model_dir, "generation_config.json")
        if os.path.isfile(gen_path):
            with open(gen_path) as f:
                eos_ids += _as_id_list(json.load(f).get("eos_token_id"))
    return ModelInfo(
        num_layers=hf_config.num_hidden_layers,
        num_kv_heads=num_kv_heads_of(hf_config),
        head_dim=head_dim_of(hf_config),
        vocab_size=hf_config.vocab_size,
        max_position_embeddings=hf_config.max_position_embeddings,
        eos_token_ids=tuple(dict.fromkeys(eos_ids)),
    )


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
