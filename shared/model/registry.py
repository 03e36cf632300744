"""Which model serves a checkpoint, by its `config.architectures[0]`.

Each family file exports `ARCHITECTURES`, a map from Hugging Face architecture name to a builder
`(hf_config) -> nn.Module`; this module merges them. Adding a family is one import here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from splitserve.shared.model import gemma, llama, mixtral, olmo2, phi3, qwen_moe


class UnsupportedArchitectureError(ValueError):
    """The checkpoint's architecture has no implementation here."""


_ARCHITECTURES: dict[str, Callable[[Any], nn.Module]] = {}
for _family in (llama, qwen_moe, mixtral, gemma, phi3, olmo2):
    _ARCHITECTURES.update(_family.ARCHITECTURES)

SUPPORTED_ARCHITECTURES = tuple(_ARCHITECTURES)


def resolve_architecture(hf_config: Any) -> Callable[[Any], nn.Module]:
    """The builder of the model for `hf_config`; raises `UnsupportedArchitectureError`."""
    architectures = getattr(hf_config, "architectures", None) or []
    name = architectures[0] if architectures else None
    if name not in _ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"architecture {name!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return _ARCHITECTURES[name]
