"""Tensor parallelism on CPU (gloo, real follower processes): TP=1, TP=2 and (see FAMILIES) TP=4
give transformers' greedy tokens with logprobs within 1e-4, for a checkpoint of every family, in one
run each that is batched, chunked (7-token steps) and hits the prefix cache. The checkpoints cover
what sharding can get wrong: one kv head for 4 q heads (replicated on every rank at TP=4), odd
per-rank head counts (Phi-3 with 6 heads: 3 a rank), a vocabulary that does not split evenly
(padded last shard), tied embeddings, fused q/k/v (Phi-3), a whole-projection q/k norm over
replicated kv heads (OLMo 2), tensor-parallel experts with and without a shared expert.

A follower killed mid-generation ends the engine with ParallelError at once (no collective
hangs), and closing it leaves no process behind."""

from __future__ import annotations

import os
import signal
import threading

import pytest
from test_parity import _eos_free, _prompts, hf_reference  # noqa: F401  (fixture)

from splitserve.shared.config import ConfigError
from splitserve.shared.llm import LLM
from splitserve.shared.parallel.state import ParallelError
from splitserve.shared.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

FAMILIES = {  # arch: (config overrides, tensor-parallel sizes beside 1)
    "llama": (dict(num_attention_heads=4, num_key_value_heads=1, vocab_size=4098), (2, 4)),
    "qwen2_moe": ({}, (2, 4)),  # shared expert; kv heads replicated at TP=4
    "olmo2": ({}, (2, 4)),  # the whole-projection q/k norm over kv heads replicated at TP=4
    "mixtral": ({}, (2,)),
    "gemma2": ({}, (2,)),  # tied embeddings, attention and final soft-caps, sliding layers
    "phi3": (dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2), (2,)),  # 3 q heads a rank
}
"""TP=4 on the three families whose sharding differs there (replication, norms over replicated heads):
every rank start costs seconds of CI's two cores. The other three passed at TP=4 too when written."""
PREFIX_LENGTH = 12
NEW_TOKENS = 8
"""Of transformers' 32 greedy tokens, the first 8: each step is a round of collectives, and CI has 2 cores."""


@pytest.fixture(scope="module", params=list(FAMILIES))
def tp_checkpoint(request, tmp_path_factory) -> str:
    from checkpoints import build_checkpoint

    arch = request.param
    return arch, build_checkpoint(str(tmp_path_factory.mktemp(arch)), arch, **FAMILIES[arch][0])


def _check(llm: LLM, hf_run, model_dir: str, prompts: list[list[int]]) -> list:
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    results = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for prompt, result in zip(prompts, results):
        ref_tokens, ref_logprobs = hf_run(model_dir, prompt)
        out = result.outputs[0]
        assert out.token_ids == ref_tokens[:NEW_TOKENS]
        ours = [entry[t].logprob for entry, t in zip(out.logprobs, out.token_ids)]
        assert max(abs(a - b) for a, b in zip(ours, ref_logprobs)) < 1e-4
    return results


def _generate(model_dir: str, tensor_parallel_size: int, hf_reference, prompts) -> None:
    """One engine: the first prompt alone (it fills the prefix cache), then all of them batched."""
    llm = LLM(model_dir, device="cpu", num_blocks=96, block_size=4, max_num_batched_tokens=7,
              tensor_parallel_size=tensor_parallel_size)
    try:
        _check(llm, hf_reference, model_dir, prompts[:1])
        results = _check(llm, hf_reference, model_dir, prompts)
        assert all(r.num_cached_tokens >= PREFIX_LENGTH for r in results)
        llm.engine.kv.check_integrity()
    finally:
        llm.close()


def test_tensor_parallel_matches_transformers(tp_checkpoint, hf_reference):
    arch, model_dir = tp_checkpoint
    vocab = 4096  # the tokenizer's: prompts stay inside it when the model's vocabulary is padded
    shared = _prompts(vocab, lengths=(PREFIX_LENGTH,), seed=3)[0]
    prompts = _eos_free(hf_reference, model_dir, _prompts(vocab, lengths=(9, 2, 15), seed=4, prefix=shared))
    for tensor_parallel_size in (1, *FAMILIES[arch][1]):
        _generate(model_dir, tensor_parallel_size, hf_reference, prompts)


def test_heads_that_do_not_split_are_refused_before_any_rank_starts(checkpoint_factory):
    with pytest.raises(ConfigError, match="4 attention heads are not divisible by tensor_parallel_size 3"):
        LLM(checkpoint_factory("llama"), device="cpu", num_blocks=8, tensor_parallel_size=3)


def test_what_tensor_parallelism_does_not_combine_with_is_refused_by_name(checkpoint_factory):
    from splitserve.shared.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
    from splitserve.shared.engine import EngineCore

    model = ModelConfig(checkpoint_factory("llama"), device="cpu")
    tp2 = ParallelConfig(tensor_parallel_size=2)
    with pytest.raises(ConfigError, match="kv_offload_gib"):
        EngineCore(EngineConfig(model, CacheConfig(kv_offload_gib=0.1), parallel=tp2))
    with pytest.raises(ConfigError, match="async_scheduling"):
        EngineCore(EngineConfig(model, scheduler=SchedulerConfig(async_scheduling=True), parallel=tp2))


def test_a_killed_follower_ends_the_engine_without_a_hang(checkpoint_factory):
    llm = LLM(checkpoint_factory("llama"), device="cpu", num_blocks=64, block_size=4, tensor_parallel_size=2)
    follower = llm.engine.followers.processes[0]
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    try:
        llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=2))  # serving
        killer = threading.Timer(0.5, os.kill, (follower.pid, signal.SIGKILL))
        killer.start()
        with pytest.raises(ParallelError, match="rank"):
            for _ in range(10_000):  # until the kill lands: a collective or the liveness check raises
                llm.generate([{"prompt_token_ids": [5, 6, 7]}], params)
        killer.join()
    finally:
        llm.close()
    follower.join(30)
    assert follower.exitcode == -signal.SIGKILL
