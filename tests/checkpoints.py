"""Tiny random Hugging Face checkpoints for tests, built with transformers itself.

    build_checkpoint(tmp_dir, arch, **overrides) -> checkpoint directory

`arch` is one of ARCHITECTURES: the Llama family ("llama", "mistral", "qwen2", "qwen3") and the
other families (NEW_FAMILIES: mixture-of-experts, Gemma, Phi-3, OLMo 2, and Mistral / Qwen2 / Qwen3
with real sliding windows shorter than the test prompts). Every checkpoint holds
the demo tokenizer (so vocab sizes match), fp32 safetensors and a config of a few layers.
Keyword overrides go to the transformers config (e.g. `tie_word_embeddings=True`,
`rope_parameters={...}`, `sliding_window=4`), except `max_shard_size`, which is passed to
`save_pretrained` to write a sharded checkpoint.

Weights are peaked on purpose (initializer_range 0.25, random norm weights and biases) so that
greedy argmax is never decided by 1e-6 differences and every tensor's loading is exercised.
"""

from __future__ import annotations

import copy
import functools
import os
from typing import Any

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
NEW_FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "gemma2", "gemma3", "phi3", "olmo2",
                "mistral_window", "qwen2_window", "qwen3_window")
ARCHITECTURES = LLAMA_FAMILY + NEW_FAMILIES

_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
# Phi-3's LongRoPE. Phi3Config's own original_max_position_embeddings (4096 by default) is what
# both sides read, not the 48 here, so the parity tests exercise the short factors only: past that
# length transformers' generate recomputes the whole cache with the long factors, which a paged
# cache that keeps earlier keys cannot match (README, "LongRoPE picks ... per position").
_LONGROPE = dict(rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=48,
                 short_factor=[1.0 + 0.1 * i for i in range(4)], long_factor=[1.0 + 0.5 * i for i in range(4)])

# Shared small shape; qwen3 gets a head_dim that is not hidden/heads to exercise the attribute.
BASE_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    initializer_range=0.25,
)
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {"head_dim": 32},
    "qwen3_moe": dict(_MOE, head_dim=32, norm_topk_prob=True, mlp_only_layers=[1]),
    "qwen2_moe": dict(_MOE, norm_topk_prob=False, shared_expert_intermediate_size=48),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32, sliding_window=None),
    "gemma2": dict(head_dim=32, query_pre_attn_scalar=24, sliding_window=6, attn_logit_softcapping=4.0,
                   final_logit_softcapping=8.0, layer_types=["sliding_attention", "full_attention"],
                   tie_word_embeddings=True),
    "gemma3": dict(head_dim=32, query_pre_attn_scalar=32, sliding_window=6, tie_word_embeddings=True,
                   layer_types=["sliding_attention", "full_attention"],
                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                    "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 2.0}}),
    "phi3": dict(pad_token_id=0, partial_rotary_factor=0.5, rope_parameters=_LONGROPE),
    "olmo2": dict(attention_bias=True),
    "mistral_window": dict(sliding_window=7),
    "qwen2_window": dict(use_sliding_window=True, sliding_window=5, max_window_layers=1),
    "qwen3_window": dict(head_dim=32, use_sliding_window=True, sliding_window=6, max_window_layers=0),
}


@functools.lru_cache(maxsize=1)
def demo_tokenizer():
    """The demo checkpoint's tokenizer (trained once per process)."""
    from splitserve.shared.demo import build_demo_tokenizer

    return build_demo_tokenizer()


def _config_and_model_classes(arch: str):
    import transformers

    names = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "mistral": ("MistralConfig", "MistralForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
        "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
        "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
        "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
        "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
        "phi3": ("Phi3Config", "Phi3ForCausalLM"),
        "olmo2": ("Olmo2Config", "Olmo2ForCausalLM"),
        "mistral_window": ("MistralConfig", "MistralForCausalLM"),
        "qwen2_window": ("Qwen2Config", "Qwen2ForCausalLM"),
        "qwen3_window": ("Qwen3Config", "Qwen3ForCausalLM"),
    }
    if arch not in names:
        raise ValueError(f"unknown test architecture {arch!r}; choose from {ARCHITECTURES}")
    config_name, model_name = names[arch]
    return getattr(transformers, config_name), getattr(transformers, model_name)


def build_checkpoint(
    tmp_dir: str, arch: str, *, seed: int | None = None, max_shard_size: str | None = None, **overrides: Any
) -> str:
    """Write a tiny random `arch` checkpoint plus the demo tokenizer into `tmp_dir`; return it.

    `seed` defaults to the architecture's index, so each architecture gets different weights."""
    import torch

    config_cls, model_cls = _config_and_model_classes(arch)
    tokenizer = demo_tokenizer()
    kwargs = dict(
        BASE_SHAPE,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    # copies: transformers fills nested rope dicts in place (e.g. partial_rotary_factor), which would
    # leak into every later checkpoint of the architecture built in this process
    kwargs.update(copy.deepcopy(ARCH_DEFAULTS[arch]))
    kwargs.update(copy.deepcopy(overrides))
    config = config_cls(**kwargs)
    torch.manual_seed(ARCHITECTURES.index(arch) if seed is None else seed)
    model = model_cls(config).eval()
    _perturb_norms_and_biases(model)
    os.makedirs(tmp_dir, exist_ok=True)
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(tmp_dir, **save_kwargs)
    tokenizer.save_pretrained(tmp_dir)
    return tmp_dir


def _perturb_norms_and_biases(model) -> None:
    """HF initialises norms to 1 and biases to 0; random values make a mix-up of them visible."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn_like(param))
