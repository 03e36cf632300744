"""KV layer groups (shared/kv/layer_groups.py): interleaved sliding-window models keep one pool and
block table per group; the sliding group's blocks go back to its pool as the window moves, a
prefix hit needs only the blocks each group can still see, and the memory the sliding layers no
longer need lets the same KV budget hold more tokens. Generation stays token-identical to
transformers (the parity tests of test_parity_families.py run Gemma 2/3 and Qwen2 with a full
layer through the same path)."""

from __future__ import annotations

import pytest
from test_parity import _check, _eos_free, _prompts, hf_reference  # noqa: F401  (fixture)
from test_sliding_window_kv import _peak_blocks_in_use

from splitserve.shared.config import CacheConfig, EngineConfig, ModelConfig
from splitserve.shared.engine import EngineCore
from splitserve.shared.kv.layer_groups import GroupedKVCacheManager, sliding_group_demand, split_layer_blocks
from splitserve.shared.llm import LLM
from splitserve.shared.sampling_params import SamplingParams


def _two_groups(**kwargs) -> GroupedKVCacheManager:
    return GroupedKVCacheManager([None, 6], [16, 16], block_size=4, **kwargs)


def test_sliding_group_frees_behind_its_window_full_group_keeps_all():
    kv = _two_groups()
    full, sliding = kv.groups
    tokens = list(range(100, 120))
    assert kv.allocate_slots("a", tokens, 0, 20) is not None
    kv.cache_computed_blocks("a", tokens, 20)
    assert kv.release_out_of_window("a", 20) == 3  # keys 0..14 are behind a window of 6 at position 20
    assert len(full.block_table("a")) == 5 and full.num_free_blocks == 11
    assert sliding.block_table("a")[:3] == [sliding.null_block] * 3 and sliding.num_free_blocks == 15 - 2
    kv.check_integrity()
    kv.free("a")
    kv.check_integrity()
    assert (full.num_free_blocks, sliding.num_free_blocks) == (16, 15)


def test_admission_needs_room_in_every_group():
    kv = GroupedKVCacheManager([None, 6], [16, 4], block_size=4)  # the sliding pool: 3 usable blocks
    tokens = list(range(20))
    assert kv.allocate_slots("a", tokens, 0, 20) is None  # 5 blocks fit the full group only
    assert kv.groups[0].num_free_blocks == 16 and not kv.block_table("a")  # nothing changed anywhere
    assert kv.allocate_slots("a", tokens, 0, 12) is not None
    kv.check_integrity()


def test_prefix_hit_needs_the_full_prefix_and_only_the_window_of_the_sliding_group():
    kv = _two_groups()
    full, sliding = kv.groups
    tokens = list(range(100, 120))
    kv.allocate_slots("a", tokens, 0, 20)
    a_full, a_sliding = full.block_ids("a"), sliding.block_ids("a")
    kv.cache_computed_blocks("a", tokens, 20)
    kv.release_out_of_window("a", 20)
    kv.free("a")
    # Evict the sliding group's block 0 (LRU first): a one-pool cache would now miss from block 0.
    taken = sliding.pool.allocate(sliding.pool.num_free_blocks - 4)
    hit, num_hit = kv.get_computed_blocks(tokens)
    # 4 blocks (16 tokens, one left to compute); a query at 16 sees keys 11.. : sliding blocks 2 and 3.
    assert num_hit == 16
    assert hit == (a_full[:4], [sliding.null_block] * 2 + a_sliding[2:4])
    sliding.pool.free(taken)
    assert kv.allocate_slots("b", tokens, 16, 4, hit) is not None
    kv.check_integrity()
    kv.cache_computed_blocks("b", tokens, 20)
    assert kv.release_out_of_window("b", 20) == 1  # blocks 0, 1 came in released; block 2 slid out now
    kv.check_integrity()
    kv.free("b")
    kv.check_integrity()
    # With the sliding group's blocks all evicted no length is served by both groups.
    taken = sliding.pool.allocate(sliding.pool.num_free_blocks)
    assert kv.get_computed_blocks(tokens) == ((), 0)
    sliding.pool.free(taken)


def test_reset_prefix_cache_waits_for_every_group_then_forgets_all():
    kv = _two_groups()
    tokens = list(range(100, 120))
    kv.allocate_slots("a", tokens, 0, 20)
    kv.cache_computed_blocks("a", tokens, 20)
    kv.release_out_of_window("a", 20)
    assert kv.reset_prefix_cache() is False  # a request holds blocks
    kv.free("a")
    assert kv.get_computed_blocks(tokens)[1] == 16
    assert kv.reset_prefix_cache() is True  # the sliding group sets its null block aside meanwhile
    assert kv.get_computed_blocks(tokens) == ((), 0)
    kv.check_integrity()
    assert kv.groups[1].num_free_blocks == 15


def test_a_keyed_session_is_retained_in_every_group():
    kv = _two_groups()
    tokens = list(range(100, 120))
    kv.allocate_slots("a", tokens, 0, 20)
    kv.cache_computed_blocks("a", tokens, 20)
    kv.retain_session("k", kv.block_hashes("a"), until_s=10.0)
    kv.free("a")
    assert [g.pool.num_retained_evictable_blocks for g in kv.groups] == [5, 5]
    kv.sessions.expire(11.0)
    assert [g.pool.num_retained_evictable_blocks for g in kv.groups] == [0, 0]
    kv.check_integrity()


def test_split_gives_sliding_groups_their_need_and_the_rest_to_full_attention():
    groups = [(None, [1, 3]), (6, [0, 2])]
    need = sliding_group_demand(6, 4, max_num_seqs=2, max_num_batched_tokens=16)
    assert need == 2 * (2 + 2) + 2 * 4 + 1
    full, sliding = split_layer_blocks(4 * 100, groups, 4, max_num_seqs=2, max_num_batched_tokens=16)
    assert sliding == need and full == (400 - 2 * need) // 2 > 100
    # A need past the equal share gets only that share: never less than one pool would give.
    assert split_layer_blocks(4 * 10, groups, 4, max_num_seqs=2, max_num_batched_tokens=16) == [10, 10]
    assert split_layer_blocks(40, [(4, [0]), (8, [1])], 4, 2, 16) == [20, 20]  # no full group: equal


def test_interleaved_models_split_the_pool_others_keep_one(checkpoint_factory):
    for arch in ("gemma2", "qwen2_window"):  # (gemma3: the async prefix-hit test below)
        engine = LLM(checkpoint_factory(arch), device="cpu", num_blocks=64, block_size=4, max_num_seqs=2,
                     max_num_batched_tokens=16).engine
        kv = engine.kv
        assert isinstance(kv, GroupedKVCacheManager), arch
        assert kv.groups[0].pool.num_blocks > 64 > kv.groups[1].pool.num_blocks, arch  # what the window spares
        assert engine.stats().kv_group_blocks == {"full": kv.groups[0].pool.num_blocks,
                                                  f"window_{kv.groups[1].window}": kv.groups[1].pool.num_blocks}
    llm = LLM(checkpoint_factory("llama"), device="cpu", num_blocks=64, block_size=4)
    assert type(llm.engine.kv).__name__ == "KVCacheManager"
    # A host tier copies whole one-pool blocks: an interleaved model keeps one pool (every block) then.
    engine = EngineCore(EngineConfig(model=ModelConfig(model=checkpoint_factory("gemma2"), device="cpu"),
                                     cache=CacheConfig(block_size=4, num_blocks=64, kv_offload_gib=0.01)))
    try:
        assert type(engine.kv).__name__ == "KVCacheManager" and engine.stats().kv_group_blocks == {}
        engine.add_request("a", list(range(3, 23)), SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
        engine.kv.check_integrity()
    finally:
        engine.close()
    # Asked for (a P/D peer with tensor parallelism keeps one pool): one pool as well.
    engine = EngineCore(EngineConfig(model=ModelConfig(model=checkpoint_factory("gemma2"), device="cpu"),
                                     cache=CacheConfig(block_size=4, num_blocks=64, split_kv_by_layer_group=False)))
    try:
        assert type(engine.kv).__name__ == "KVCacheManager" and engine.stats().kv_group_blocks == {}
    finally:
        engine.close()


@pytest.mark.parametrize("arch", ["gemma2", "qwen2_window"])
def test_same_budget_admits_more_tokens_and_sliding_blocks_return(checkpoint_factory, hf_reference, arch):
    model_dir = checkpoint_factory(arch)
    # 24 one-pool blocks of 4 tokens hold 96 tokens; these two requests need 2 x 14 blocks at once.
    llm = LLM(model_dir, device="cpu", num_blocks=24, block_size=4, max_num_seqs=2, max_num_batched_tokens=16,
              enable_prefix_caching=False)
    kv = llm.engine.kv
    full, sliding = kv.groups
    assert sliding.window < 22 and full.pool.num_blocks >= 28 and sliding.pool.num_blocks < 24
    prompts = _eos_free(hf_reference, model_dir, _prompts(llm.engine.model_info.vocab_size, lengths=(24, 22)))
    assert sum(-(-(len(p) + 32) // 4) for p in prompts) > 24  # more than one pool of this budget holds
    peak = _peak_blocks_in_use(llm, prompts, sliding)
    assert llm.engine.scheduler.num_preemptions == 0
    assert peak <= 2 * (-(-sliding.window // 4) + 2) + 4 < sum(-(-(len(p) + 32) // 4) for p in prompts)
    assert sliding.num_free_blocks == sliding.pool.num_blocks - 1 and full.num_free_blocks == full.pool.num_blocks
    _check(llm, hf_reference, model_dir, prompts)  # token-identical on this layout
    assert llm.engine.scheduler.num_preemptions == 0


def test_prefix_hit_across_groups_is_token_identical_async(checkpoint_factory, hf_reference):
    model_dir = checkpoint_factory("gemma3")
    llm = LLM(model_dir, device="cpu", num_blocks=64, block_size=4, max_num_seqs=2, async_scheduling=True)
    vocab = llm.engine.model_info.vocab_size
    shared = _prompts(vocab, lengths=(26,), seed=3)[0]
    prompts = _eos_free(hf_reference, model_dir, _prompts(vocab, lengths=(5, 11), seed=4, prefix=shared))
    _check(llm, hf_reference, model_dir, prompts[:1])
    results = _check(llm, hf_reference, model_dir, prompts[1:])
    assert all(r.num_cached_tokens >= 24 for r in results)  # the shared blocks, window-deep in the sliding group
    llm.engine.kv.check_integrity()
