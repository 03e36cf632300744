"""Which model class serves a checkpoint, by its `config.architectures[0]`.

All supported architectures share `LlamaForCausalLM`; each entry here reads its variant's
flags (biases, q/k norm, sliding windows) from the Hugging Face config.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from splitserve.shared.model.llama import LlamaFlags, LlamaForCausalLM


class UnsupportedArchitectureError(ValueError):
    """The checkpoint's architecture has no implementation here."""


def _windows_from_layer_types(cfg: Any) -> tuple[int | None, ...]:
    """Qwen2/Qwen3: `layer_types` marks the sliding layers (none unless use_sliding_window)."""
    layer_types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    window = getattr(cfg, "sliding_window", None)
    if not getattr(cfg, "use_sliding_window", False):
        window = None
    return tuple(window if kind == "sliding_attention" else None for kind in layer_types)


def _llama(cfg: Any) -> LlamaFlags:
    bias = bool(getattr(cfg, "attention_bias", False))
    return LlamaFlags(
        qkv_bias=bias,
        o_proj_bias=bias,
        mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
        qk_norm=False,
        sliding_windows=(None,) * cfg.num_hidden_layers,
    )


def _mistral(cfg: Any) -> LlamaFlags:
    window = getattr(cfg, "sliding_window", None)  # every layer
    return LlamaFlags(False, False, False, qk_norm=False, sliding_windows=(window,) * cfg.num_hidden_layers)


def _qwen2(cfg: Any) -> LlamaFlags:
    return LlamaFlags(True, False, False, qk_norm=False, sliding_windows=_windows_from_layer_types(cfg))


def _qwen3(cfg: Any) -> LlamaFlags:
    bias = bool(getattr(cfg, "attention_bias", False))
    return LlamaFlags(bias, bias, False, qk_norm=True, sliding_windows=_windows_from_layer_types(cfg))


_ARCHITECTURES: dict[str, tuple[type[nn.Module], Callable[[Any], LlamaFlags]]] = {
    "LlamaForCausalLM": (LlamaForCausalLM, _llama),
    "MistralForCausalLM": (LlamaForCausalLM, _mistral),
    "Qwen2ForCausalLM": (LlamaForCausalLM, _qwen2),
    "Qwen3ForCausalLM": (LlamaForCausalLM, _qwen3),
}

SUPPORTED_ARCHITECTURES = tuple(_ARCHITECTURES)


def resolve_architecture(hf_config: Any) -> tuple[type[nn.Module], LlamaFlags]:
    """The model class and its flags for `hf_config`; raises `UnsupportedArchitectureError`."""
    architectures = getattr(hf_config, "architectures", None) or []
    name = architectures[0] if architectures else None
    if name not in _ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"architecture {name!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    model_cls, flags_of = _ARCHITECTURES[name]
    return model_cls, flags_of(hf_config)
