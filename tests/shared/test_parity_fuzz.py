"""Parity with transformers on the tiny configurations that a config fuzzer (random heads, head
dims, windows, RoPE variants, MoE options) found served wrongly, plus two far from the defaults,
and the options that are refused at load instead.

Each case runs batched prompts (block size 16) and chunked prefill (block size 4, 7-token steps):
greedy tokens equal `generate(do_sample=False)`, logprobs within 1e-4 (fp32), as in
test_parity_families.py. A prompt is not used where transformers' raw argmax was EOS (its
`min_new_tokens` masks it, our `ignore_eos` does not) or where a step's top two logits nearly tie.
"""

from __future__ import annotations

import random

import pytest
import torch

from splitserve.shared.llm import LLM
from splitserve.shared.model import UnsupportedConfigError, load_model
from splitserve.shared.sampling_params import SamplingParams

NUM_NEW_TOKENS = 24
PROMPT_LENGTHS = (5, 17, 40, 3, 1)
NEAR_TIE = 1e-4

CASES = {
    # Built without the checkpoint's q/k/v biases: loading failed on the "missing" biases.
    "qwen2_moe_no_qkv_bias": ("qwen2_moe", dict(qkv_bias=False, num_experts=3, num_experts_per_tok=3,
                                                 decoder_sparse_step=2, mlp_only_layers=[], num_hidden_layers=3)),
    # transformers applies the window on every layer (Qwen3-MoE has no layer_types): we applied none.
    "qwen3_moe_sliding_window": ("qwen3_moe", dict(use_sliding_window=True, sliding_window=3, num_key_value_heads=1,
                                                    head_dim=24, norm_topk_prob=False)),
    # transformers' Gemma 3 never soft-caps attention scores: we did.
    "gemma3_attn_softcap_ignored": ("gemma3", dict(attn_logit_softcapping=2.0, final_logit_softcapping=30.0,
                                                   num_hidden_layers=3, layer_types=None, sliding_window_pattern=2)),
    # A shared expert of 0 channels (saved with 0-row weights): loading failed on "unknown" weights.
    "qwen2_moe_no_shared_expert": ("qwen2_moe", dict(shared_expert_intermediate_size=0, norm_topk_prob=True)),
    # Far from the defaults: MQA, head_dim 80 over hidden 100, llama3 RoPE, every bias, tied head.
    "llama_mqa_head80_llama3": ("llama", dict(hidden_size=100, num_attention_heads=5, num_key_value_heads=1,
                                              head_dim=80, attention_bias=True, mlp_bias=True,
                                              tie_word_embeddings=True, num_hidden_layers=3,
                                              rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                                               "factor": 8.0, "low_freq_factor": 1.0,
                                                               "high_freq_factor": 4.0,
                                                               "original_max_position_embeddings": 32})),
    # Far from the defaults: YaRN with mscale, every layer sliding by 4, one kv head, head_dim 12.
    "mistral_yarn_window4": ("mistral_window", dict(sliding_window=4, num_attention_heads=6, num_key_value_heads=1,
                                                    head_dim=12, hidden_size=72, num_hidden_layers=1,
                                                    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                                                                     "factor": 4.0, "mscale": 1.0,
                                                                     "mscale_all_dim": 0.5,
                                                                     "original_max_position_embeddings": 16})),
}

REFUSED = {
    # transformers' Llama rotates whole heads whatever the factor (and fails under scaled RoPE types).
    "llama_partial_rotary": ("llama", dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    # An encoder's attention: not causal, so not servable over a causal KV cache.
    "gemma3_bidirectional": ("gemma3", dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
}


@pytest.fixture(scope="module")
def hf_greedy():
    """(dir, prompt) -> (tokens, logprobs) of transformers' greedy continuation, or None when
    the prompt is unusable (an EOS argmax that min_new_tokens masked, or a near-tie)."""
    from transformers import AutoModelForCausalLM

    models, cache = {}, {}

    def run(model_dir: str, prompt: list[int]):
        key = (model_dir, tuple(prompt))
        if key not in cache:
            if model_dir not in models:
                models[model_dir] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            out = models[model_dir].generate(
                torch.tensor([prompt]), do_sample=False, max_new_tokens=NUM_NEW_TOKENS,
                min_new_tokens=NUM_NEW_TOKENS, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
            tokens = out.sequences[0, len(prompt):].tolist()
            logits = torch.stack([step[0].float() for step in out.logits])  # [new tokens, V]
            top2 = logits.topk(2, dim=-1).values
            usable = logits.argmax(-1).tolist() == tokens and (top2[:, 0] - top2[:, 1]).min().item() >= NEAR_TIE
            logprobs = torch.log_softmax(logits, -1)[torch.arange(len(tokens)), tokens].tolist()
            cache[key] = (tokens, logprobs) if usable else None
        return cache[key]

    return run


def _usable_prompts(hf_greedy, model_dir: str, vocab_size: int) -> list[list[int]]:
    rng = random.Random(0)
    prompts = [[rng.randrange(3, vocab_size) for _ in range(n)] for n in PROMPT_LENGTHS]
    kept = [p for p in prompts if hf_greedy(model_dir, p) is not None]
    assert len(kept) >= 2, "too few EOS-free, tie-free prompts to test with"
    return kept


@pytest.mark.parametrize("case", list(CASES))
def test_fuzz_found_config_parity(case, checkpoint_factory, hf_greedy):
    arch, overrides = CASES[case]
    model_dir = checkpoint_factory(arch, **overrides)
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True, logprobs=0)
    prompts = None
    for kwargs in (dict(block_size=16), dict(block_size=4, max_num_batched_tokens=7)):
        llm = LLM(model_dir, device="cpu", num_blocks=256, **kwargs)
        prompts = prompts or _usable_prompts(hf_greedy, model_dir, llm.engine.model_info.vocab_size)
        results = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        for prompt, result in zip(prompts, results):
            ref_tokens, ref_logprobs = hf_greedy(model_dir, prompt)
            out = result.outputs[0]
            assert out.token_ids == ref_tokens, (kwargs, len(prompt))
            ours = [entry[t].logprob for entry, t in zip(out.logprobs, out.token_ids)]
            assert max(abs(a - b) for a, b in zip(ours, ref_logprobs)) < 1e-4, (kwargs, len(prompt))
        llm.engine.kv.check_integrity()
        llm.close()


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_option_is_refused_at_load(case, checkpoint_factory):
    arch, overrides, field = REFUSED[case]
    with pytest.raises(UnsupportedConfigError, match=field):
        load_model(checkpoint_factory(arch, **overrides), torch.float32, torch.device("cpu"))
