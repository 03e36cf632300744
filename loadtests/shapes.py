"""Real model shapes for benchmarks with random weights (`--load-format dummy`): throughput does
not depend on weight values, so a config.json alone stands in for the checkpoint."""

from __future__ import annotations

import json
import os

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

SHAPES: dict[str, dict] = {
    # A model with almost no compute: on CPU the engine outruns the stack around it, so a served run
    # of it measures the serving pipeline's own cost per token (processes, RPC, HTTP).
    "pipeline-tiny": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64,
                          intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=32, vocab_size=4096, max_position_embeddings=4096,
                          rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                          bos_token_id=2, eos_token_id=1),
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
    "qwen2.5-0.5b": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=896,
                         intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                         use_sliding_window=False, bos_token_id=151643, eos_token_id=151645),
    "qwen2.5-7b": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=3584,
                       intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                       use_sliding_window=False, bos_token_id=151643, eos_token_id=151645),
    # Mixture of experts: 128 experts, 8 routed per token, ~3.3B of 30.5B parameters active.
    "qwen3-30b-a3b": dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=2048,
                          intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                          norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936,
                          max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
                          tie_word_embeddings=False, use_sliding_window=False, bos_token_id=151643,
                          eos_token_id=151645),
    # Qwen2-MoE: 60 experts, 4 routed per token, plus a gated shared expert every token passes;
    # ~2.7B of 14.3B parameters active.
    "qwen1.5-moe-a2.7b": dict(architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", hidden_size=2048,
                              intermediate_size=5632, moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
                              num_experts=60, num_experts_per_tok=4, norm_topk_prob=False, decoder_sparse_step=1,
                              mlp_only_layers=[], num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                              vocab_size=151936, max_position_embeddings=8192, rope_theta=1000000.0, rms_norm_eps=1e-6,
                              tie_word_embeddings=False, use_sliding_window=False, bos_token_id=151643,
                              eos_token_id=151643),
    # 8 experts, 2 routed per token, ~12.9B of 46.7B active (93 GB in bf16: ours and the peer run one
    # after the other on one H200).
    "mixtral-8x7b": dict(architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_size=4096,
                         intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                         max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-5,
                         sliding_window=None, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
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


def moe_experts(name: str) -> tuple[int, int, int]:
    """(experts, experts per token, expert intermediate size); (0, 0, 0) for a dense shape."""
    c = SHAPES[name]
    num_experts = c.get("num_experts") or c.get("num_local_experts") or 0
    if not num_experts:
        return 0, 0, 0
    return num_experts, c["num_experts_per_tok"], c.get("moe_intermediate_size") or c["intermediate_size"]


def _attention_params(c: dict) -> int:
    h = c["hidden_size"]
    d = c.get("head_dim", h // c["num_attention_heads"])
    params = h * d * (c["num_attention_heads"] * 2 + c["num_key_value_heads"] * 2)
    if c["model_type"] in ("qwen2", "qwen2_moe"):  # q/k/v biases
        params += d * (c["num_attention_heads"] + 2 * c["num_key_value_heads"])
    if c["model_type"].startswith("qwen3"):  # per-head q and k RMSNorm weights
        params += 2 * d
    return params


def expert_params(name: str) -> int:
    """Parameters of one expert of one layer (gate, up, down); 0 for a dense shape."""
    _, _, inter = moe_experts(name)
    return 3 * SHAPES[name]["hidden_size"] * inter


def param_count(name: str, active_experts: float | None = None) -> int:
    """All parameters; with `active_experts`, counting only that many experts per MoE layer (the
    active parameters of one token: `active_experts` = experts per token)."""
    c = SHAPES[name]
    h, layers, v = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    num_experts, _, _ = moe_experts(name)
    if num_experts:
        experts = num_experts if active_experts is None else active_experts
        mlp = experts * expert_params(name) + h * num_experts  # experts + router
        if c.get("shared_expert_intermediate_size"):  # the shared expert and its gate
            mlp += 3 * h * c["shared_expert_intermediate_size"] + h
    else:
        mlp = 3 * h * c["intermediate_size"]
    per_layer = _attention_params(c) + mlp + 2 * h
    head = 0 if c["tie_word_embeddings"] else v * h
    return int(layers * per_layer + v * h + head + h)


def expected_experts_touched(name: str, batch: int) -> float:
    """Experts of one layer that a decode step of `batch` tokens reads, under uniform routing (what
    random weights give): each expert is missed by a token with probability 1 - k/E."""
    num_experts, top_k, _ = moe_experts(name)
    if not num_experts:
        return 0.0
    return num_experts * (1 - (1 - top_k / num_experts) ** batch)


def kv_bytes_per_token(name: str, dtype_bytes: int = 2) -> int:
    c = SHAPES[name]
    d = c.get("head_dim", c["hidden_size"] // c["num_attention_heads"])
    return c["num_hidden_layers"] * 2 * c["num_key_value_heads"] * d * dtype_bytes
