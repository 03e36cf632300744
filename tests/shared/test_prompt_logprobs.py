"""Prompt logprobs (vLLM's `prompt_logprobs`) against transformers' log-softmax of the prompt.

Each prompt token from the second on gets its logprob under the model given the tokens before
it, its rank and the top-k alternatives; the same whether the prompt runs in one step or in small
chunks, whether it shares a prefix with an earlier request (no prefix-cache hit may skip a
position), in sync or async scheduling, and alongside a request that asked for none.
"""

from __future__ import annotations

import random

import pytest
import torch

from splitserve.shared.llm import LLM
from splitserve.shared.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def llama(checkpoint_factory):
    from transformers import AutoModelForCausalLM

    model_dir = checkpoint_factory("llama")
    return model_dir, AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _reference(model, prompt: list[int]) -> torch.Tensor:
    """[len(prompt) - 1, V]: row i is the log-softmax that predicts prompt token i + 1."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


def _check(entries, prompt: list[int], reference: torch.Tensor, k: int) -> None:
    assert entries[0] is None and len(entries) == len(prompt)
    for i, entry in enumerate(entries[1:]):
        token = prompt[i + 1]
        expected = reference[i]
        assert entry[token].logprob == pytest.approx(expected[token].item(), abs=1e-4)
        assert entry[token].rank == int((expected >= expected[token]).sum())
        top = expected.topk(k).indices.tolist() if k else []
        assert [t for t in entry if t != token] == [t for t in top if t != token]
        for rank, t in enumerate(top, start=1):
            assert entry[t].logprob == pytest.approx(expected[t].item(), abs=1e-4)
            assert t == token or entry[t].rank == rank


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_prompt_logprobs_match_transformers_chunked_and_prefix_shared(llama, async_scheduling):
    model_dir, hf = llama
    rng = random.Random(3)
    shared = [rng.randrange(3, 4000) for _ in range(20)]
    prompts = [shared + [rng.randrange(3, 4000) for _ in range(n)] for n in (3, 11)]
    llm = LLM(model_dir, device="cpu", block_size=4, max_num_batched_tokens=8, async_scheduling=async_scheduling)
    # The first request fills the prefix cache; the second must still score every position.
    first = llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(temperature=0.0, max_tokens=2))[0]
    assert first.prompt_logprobs is None
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        [SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=2),
                         SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=0)])
    for out, prompt, k in zip(outs, prompts, (2, 0)):
        _check(out.prompt_logprobs, prompt, _reference(hf, prompt), k)
        assert out.num_cached_tokens == 0
