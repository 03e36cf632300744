"""Real model shapes for benchmarks with random weights (`--load-format dummy`): throughput does
not depend on weight values, so a config.json alone stands in for the checkpoint."""

from __future__ import annotations

import json
import os

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

SHAPES: dict[str, dict] = {
    "llama-3.2-1b": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048,
                         intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                         rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001),
    "llama-3.1-8b": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096,
                         intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
                         rope_theta=500000.0, rope_scaling={**_LLAMA3_ROPE, "factor": 8.0}, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001),
    "qwen2.5-7b": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=3584,
                       intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                       use_sliding_window=False, bos_token_id=151643, eos_token_id=151645),
}


def write_shape(name: str, out_dir: str) -> str:
    """Write `config.json` of a known shape into out_dir (weights come from --load-format dummy)."""
    if name not in SHAPES:
        raise SystemExit(f"unknown shape {name!r}; choose from {sorted(SHAPES)}")
    os.makedirs(out_dir, exist_ok=True)
    config = dict(SHAPES[name], torch_dtype="bfloat16", initializer_range=0.02, hidden_act="silu")
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return out_dir


def param_count(name: str) -> int:
    c = SHAPES[name]
    h, i, layers, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    d = c.get("head_dim", h // c["num_attention_heads"])
    attn = h * d * (c["num_attention_heads"] * 2 + c["num_key_value_heads"] * 2)
    per_layer = attn + 3 * h * i + 2 * h
    head = 0 if c["tie_word_embeddings"] else v * h
    return layers * per_layer + v * h + head + h


def kv_bytes_per_token(name: str, dtype_bytes: int = 2) -> int:
    c = SHAPES[name]
    d = c.get("head_dim", c["hidden_size"] // c["num_attention_heads"])
    return c["num_hidden_layers"] * 2 * c["num_key_value_heads"] * d * dtype_bytes
