"""Sliding-window block release: blocks a window slid past go back to the pool (every-layer-sliding
models), stay findable by the prefix cache, and generation stays token-identical to transformers."""

from __future__ import annotations

import pytest
from test_parity import _check, _eos_free, _prompts, hf_reference  # noqa: F401  (fixture)

from splitserve.shared.kv.sliding_window import SlidingWindowKVCacheManager
from splitserve.shared.llm import LLM
from splitserve.shared.sampling_params import SamplingParams


def test_blocks_behind_the_window_return_to_the_pool():
    kv = SlidingWindowKVCacheManager(num_blocks=16, block_size=4, window=6)
    assert kv.num_free_blocks == 15  # one is the null block
    tokens = list(range(100, 120))
    table = kv.allocate_slots("a", tokens, 0, 20)
    kv.cache_computed_blocks("a", tokens, 20)
    assert kv.release_out_of_window("a", 20) == 3  # keys 0..14 are behind a window of 6 at position 20
    assert kv.num_free_blocks == 15 - 5 + 3
    assert kv.block_table("a") == [kv.null_block] * 3 + table[3:]
    assert kv.release_out_of_window("a", 20) == 0  # idempotent
    kv.check_integrity()
    # The released blocks keep their prefix hashes: a second request with the same prompt hits them.
    hit_blocks, num_hit = kv.get_computed_blocks(tokens)
    assert hit_blocks == table[:4] and num_hit == 16
    kv.allocate_slots("b", tokens, 16, 4, hit_blocks)
    kv.check_integrity()
    kv.free("a")
    kv.free("b")
    kv.check_integrity()
    assert kv.num_free_blocks == 15


def test_release_never_passes_unregistered_blocks():
    kv = SlidingWindowKVCacheManager(num_blocks=16, block_size=4, window=2)
    tokens = list(range(20))
    kv.allocate_slots("a", tokens, 0, 20)
    assert kv.release_out_of_window("a", 20) == 0  # nothing hashed yet: a hash must never name the null block
    kv.cache_computed_blocks("a", tokens, 20)
    assert kv.release_out_of_window("a", 20) == 4
    kv.check_integrity()


def _peak_blocks_in_use(llm: LLM, prompts: list[list[int]], kv: SlidingWindowKVCacheManager | None = None) -> int:
    """Run `prompts` to the end; the most blocks of `kv` (default: the engine's manager) in use
    at once, the null block not counted, with its integrity checked after every step."""
    engine = llm.engine
    kv = engine.kv if kv is None else kv
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    peak = 0
    while engine.has_unfinished_requests():
        engine.step()
        peak = max(peak, kv.pool.num_blocks - 1 - kv.num_free_blocks)
        engine.kv.check_integrity()
    return peak


@pytest.mark.parametrize("arch", ["mistral_window", "qwen3_window"])
def test_window_model_holds_only_its_window(checkpoint_factory, hf_reference, arch):
    model_dir = checkpoint_factory(arch)
    llm = LLM(model_dir, device="cpu", num_blocks=64, block_size=4)
    assert llm.engine.kv.window < 40  # prompts below are longer than the window
    prompts = _eos_free(hf_reference, model_dir, _prompts(llm.engine.model_info.vocab_size, lengths=(40, 33, 25)))
    _check(llm, hf_reference, model_dir, prompts)  # token-identical while blocks are released
    full_attention_need = sum(-(-(len(p) + 32) // 4) for p in prompts)
    peak = _peak_blocks_in_use(llm, prompts)
    assert peak < full_attention_need / 2, (peak, full_attention_need)
    assert llm.engine.kv.num_free_blocks == 63  # all back, the null block aside

