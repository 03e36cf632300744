"""Our engine against Hugging Face transformers on the same tiny checkpoints.

For each architecture, several prompts of different lengths run batched through our engine;
greedy tokens must equal `model.generate(do_sample=False)` token for token and our logprobs must
match transformers' log-softmax within 1e-4 (fp32). The same must hold when prefill is chunked
small, when prompts share a prefix that hits the prefix cache, and when a tiny block pool
forces preemption.
"""

from __future__ import annotations

import random

import pytest
import torch

from splitserve.shared.llm import LLM
from splitserve.shared.sampling_params import SamplingParams

NUM_NEW_TOKENS = 32
PROMPT_LENGTHS = (5, 17, 40, 3)


def _prompts(vocab_size: int, lengths=PROMPT_LENGTHS, seed: int = 0, prefix: list[int] | None = None) -> list[list[int]]:
    rng = random.Random(seed)
    return [(prefix or []) + [rng.randrange(3, vocab_size) for _ in range(n)] for n in lengths]


# A greedy step whose top two logits are closer than this is a tie: a different (correct)
# summation order may pick either token, so a prompt that meets one is not used for parity.
NEAR_TIE = 1e-4


@pytest.fixture(scope="module")
def hf_reference():
    """(checkpoint dir, prompt tuple) -> (tokens, logprobs of those tokens) from transformers.
    `run.min_gap(dir, prompt)`: the smallest top-1 - top-2 logit gap along that greedy path."""
    from transformers import AutoModelForCausalLM

    models, cache, gaps = {}, {}, {}

    def run(model_dir: str, prompt: list[int]) -> tuple[list[int], list[float]]:
        key = (model_dir, tuple(prompt))
        if key not in cache:
            if model_dir not in models:
                models[model_dir] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            model = models[model_dir]
            out = model.generate(
                torch.tensor([prompt]), do_sample=False, max_new_tokens=NUM_NEW_TOKENS, min_new_tokens=NUM_NEW_TOKENS,
                output_logits=True, return_dict_in_generate=True, pad_token_id=0,
            )
            tokens = out.sequences[0, len(prompt):].tolist()
            logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens)]
            cache[key] = (tokens, logprobs)
            top2 = torch.stack([step[0].float().topk(2).values for step in out.logits])  # [new tokens, 2]
            gaps[key] = (top2[:, 0] - top2[:, 1]).min().item()
        return cache[key]

    def min_gap(model_dir: str, prompt: list[int]) -> float:
        run(model_dir, prompt)
        return gaps[(model_dir, tuple(prompt))]

    run.min_gap = min_gap
    return run


def _eos_free(hf_run, model_dir, prompts):
    """Keep prompts whose HF greedy continuation never hits EOS (HF's min_new_tokens masks EOS,
    our ignore_eos does not, so a prompt whose argmax is EOS would differ by definition) and
    never meets a near-tie (NEAR_TIE: either token would be a correct greedy choice)."""
    from splitserve.shared.tokenizer import load_tokenizer

    eos = load_tokenizer(model_dir).eos_token_id
    kept = [p for p in prompts if eos not in hf_run(model_dir, p)[0] and hf_run.min_gap(model_dir, p) >= NEAR_TIE]
    assert len(kept) >= 2, "too few EOS-free, tie-free prompts to test with"
    return kept


def _check(llm: LLM, hf_run, model_dir: str, prompts: list[list[int]]) -> list:
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True, logprobs=0)
    results = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for prompt, result in zip(prompts, results):
        ref_tokens, ref_logprobs = hf_run(model_dir, prompt)
        out = result.outputs[0]
        assert out.token_ids == ref_tokens
        ours = [entry[t].logprob for entry, t in zip(out.logprobs, out.token_ids)]
        assert max(abs(a - b) for a, b in zip(ours, ref_logprobs)) < 1e-4
    return results


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def async_scheduling(request) -> bool:
    """Every parity test also runs with async scheduling (step N+1 launched before N's tokens are read)."""
    return request.param


def test_greedy_parity_batched(tiny_checkpoint, hf_reference, async_scheduling):
    arch, model_dir = tiny_checkpoint
    llm = LLM(model_dir, device="cpu", num_blocks=256, block_size=16, async_scheduling=async_scheduling)
    assert llm.engine.async_scheduling is async_scheduling
    prompts = _eos_free(hf_reference, model_dir, _prompts(llm.engine.model_info.vocab_size))
    _check(llm, hf_reference, model_dir, prompts)
    llm.engine.kv.check_integrity()
    assert llm.engine.kv.num_free_blocks == 256


def test_greedy_parity_chunked_prefill(tiny_checkpoint, hf_reference, async_scheduling):
    arch, model_dir = tiny_checkpoint
    llm = LLM(model_dir, device="cpu", num_blocks=256, block_size=4, max_num_batched_tokens=7,
              async_scheduling=async_scheduling)
    prompts = _eos_free(hf_reference, model_dir, _prompts(llm.engine.model_info.vocab_size))
    _check(llm, hf_reference, model_dir, prompts)
    llm.engine.kv.check_integrity()


def test_greedy_parity_prefix_cache(tiny_checkpoint, hf_reference, async_scheduling):
    arch, model_dir = tiny_checkpoint
    llm = LLM(model_dir, device="cpu", num_blocks=256, block_size=4, async_scheduling=async_scheduling)
    vocab = llm.engine.model_info.vocab_size
    shared = _prompts(vocab, lengths=(24,), seed=7)[0]
    prompts = _eos_free(hf_reference, model_dir, _prompts(vocab, lengths=(3, 9, 1), seed=8, prefix=shared))
    _check(llm, hf_reference, model_dir, prompts[:1])  # fills the cache with the shared prefix
    results = _check(llm, hf_reference, model_dir, prompts)
    assert all(r.num_cached_tokens >= 24 for r in results)
    llm.engine.kv.check_integrity()


def test_greedy_parity_under_preemption(tiny_checkpoint, hf_reference, async_scheduling):
    arch, model_dir = tiny_checkpoint
    # 4-token blocks, 24 blocks: each request needs up to 18 blocks, so several cannot run at once.
    llm = LLM(model_dir, device="cpu", num_blocks=24, block_size=4, enable_prefix_caching=False,
              async_scheduling=async_scheduling)
    prompts = _eos_free(hf_reference, model_dir, _prompts(llm.engine.model_info.vocab_size))
    _check(llm, hf_reference, model_dir, prompts)
    assert llm.engine.scheduler.num_preemptions > 0
    llm.engine.kv.check_integrity()
    assert llm.engine.kv.num_free_blocks == 24
