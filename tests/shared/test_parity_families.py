"""The parity checks of test_parity.py for every other family (mixture-of-experts, Gemma 2/3,
Phi-3, OLMo 2) and for Mistral / Qwen2 / Qwen3 with sliding windows shorter than the prompts:
batched greedy tokens equal transformers' `generate`, logprobs within 1e-4, also with prefill
chunked small, a prefix-cache hit and forced preemption. Synchronous scheduling only: the async
path does not depend on the architecture and test_parity.py covers it."""

from __future__ import annotations

from test_parity import PROMPT_LENGTHS, _check, _eos_free, _prompts, hf_reference  # noqa: F401  (fixture)

from splitserve.shared.llm import LLM


def _num_usable_blocks(llm: LLM) -> int:
    """The pool less the null block that sliding-window block tables reserve."""
    return llm.engine.kv.pool.num_blocks - (1 if hasattr(llm.engine.kv, "null_block") else 0)


def test_greedy_parity_batched(family_checkpoint, hf_reference):
    _, model_dir = family_checkpoint
    llm = LLM(model_dir, device="cpu", num_blocks=256, block_size=16)
    prompts = _eos_free(hf_reference, model_dir, _prompts(llm.engine.model_info.vocab_size))
    _check(llm, hf_reference, model_dir, prompts)
    llm.engine.kv.check_integrity()
    assert llm.engine.kv.num_free_blocks == _num_usable_blocks(llm)


def test_greedy_parity_chunked_prefill(family_checkpoint, hf_reference):
    _, model_dir = family_checkpoint
    llm = LLM(model_dir, device="cpu", num_blocks=256, block_size=4, max_num_batched_tokens=7)
    prompts = _eos_free(hf_reference, model_dir, _prompts(llm.engine.model_info.vocab_size))
    _check(llm, hf_reference, model_dir, prompts)
    llm.engine.kv.check_integrity()


def test_greedy_parity_prefix_cache(family_checkpoint, hf_reference):
    _, model_dir = family_checkpoint
    llm = LLM(model_dir, device="cpu", num_blocks=256, block_size=4)
    vocab = llm.engine.model_info.vocab_size
    shared = _prompts(vocab, lengths=(24,), seed=7)[0]
    prompts = _eos_free(hf_reference, model_dir, _prompts(vocab, lengths=(3, 9, 1), seed=8, prefix=shared))
    _check(llm, hf_reference, model_dir, prompts[:1])
    results = _check(llm, hf_reference, model_dir, prompts)
    assert all(r.num_cached_tokens >= 24 for r in results)
    llm.engine.kv.check_integrity()


def test_greedy_parity_under_preemption(family_checkpoint, hf_reference):
    _, model_dir = family_checkpoint
    # 4-token blocks: a request needs up to 18 blocks with full attention, so several cannot run at
    # once in 24. Models whose every layer slides hold only ~3 blocks a request (the rest go back to
    # the pool as the window moves): eight requests in 18 blocks, prefill chunks of 16, still preempt.
    llm = LLM(model_dir, device="cpu", num_blocks=24, block_size=4, enable_prefix_caching=False)
    lengths = PROMPT_LENGTHS
    if hasattr(llm.engine.kv, "null_block"):
        llm = LLM(model_dir, device="cpu", num_blocks=18, block_size=4, enable_prefix_caching=False,
                  max_num_batched_tokens=16)
        lengths = (5, 17, 40, 3, 30, 25, 12, 20)
    prompts = _eos_free(hf_reference, model_dir, _prompts(llm.engine.model_info.vocab_size, lengths=lengths))
    _check(llm, hf_reference, model_dir, prompts)
    assert llm.engine.scheduler.num_preemptions > 0
    llm.engine.kv.check_integrity()
    assert llm.engine.kv.num_free_blocks == _num_usable_blocks(llm)
