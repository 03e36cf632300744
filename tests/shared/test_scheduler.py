"""Scheduler lifecycle without a model: steps are driven by a fake runner that "computes" the
scheduled tokens and samples token 7 for every request that caught up. Every scenario ends with
a leak check: all blocks free, pool consistent, no request left in any queue."""

from __future__ import annotations

from splitserve.shared.config import SchedulerConfig
from splitserve.shared.kv import KVCacheManager
from splitserve.shared.request import Request, RequestStatus
from splitserve.shared.sampling_params import SamplingParams
from splitserve.shared.scheduler import Scheduler, SchedulerOutput


def make(num_blocks=64, block_size=4, **config) -> Scheduler:
    return Scheduler(SchedulerConfig(**config), KVCacheManager(num_blocks, block_size))


def request(rid: str, prompt_len: int, max_tokens: int = 3, priority: int = 0, first_token: int = 0) -> Request:
    prompt = [first_token + i + 1 for i in range(prompt_len)]
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens), max_tokens, priority=priority,
                   arrival_time=float(len(rid)) + prompt_len * 1e-6)


def fake_step(s: Scheduler, out: SchedulerOutput) -> list[str]:
    """Apply a step's results as the engine would; returns the ids that finished."""
    finished = []
    for sr in out.scheduled:
        req, samples = sr.request, sr.samples
        req.num_computed_tokens += sr.num_new_tokens
        s.kv.cache_computed_blocks(req.request_id, req.all_token_ids, req.num_computed_tokens)
        if samples:
            req.append_output(7)
            if len(req.output_token_ids) >= req.max_tokens:
                s.remove(req.request_id)
                s.kv.free(req.request_id)
                finished.append(req.request_id)
    return finished


def run_to_completion(s: Scheduler, max_steps: int = 200) -> list[SchedulerOutput]:
    outs = []
    for _ in range(max_steps):
        if not s.num_unfinished:
            return outs
        out = s.schedule()
        outs.append(out)
        fake_step(s, out)
    raise AssertionError("scheduler did not drain")


def assert_empty(s: Scheduler) -> None:
    assert s.num_unfinished == 0 and not s.running and not s.waiting and not s.loading
    s.kv.check_integrity()
    assert s.kv.num_free_blocks == s.kv.pool.num_blocks


def test_budget_is_respected_and_decodes_go_first():
    s = make(max_num_batched_tokens=16)
    for i, rid in enumerate(("a", "bb", "ccc")):
        s.add(request(rid, 10, first_token=100 * i))  # distinct prompts: no prefix-cache hits
    outs = run_to_completion(s)
    assert all(o.num_batched_tokens <= 16 for o in outs)
    first, second = outs[0], outs[1]
    assert [(x.request.request_id, x.num_new_tokens) for x in first.scheduled] == [("a", 10), ("bb", 6)]
    # step 2: a decodes (running first), bb finishes its prompt, ccc gets the rest of the budget
    assert [(x.request.request_id, x.num_new_tokens) for x in second.scheduled] == [("a", 1), ("bb", 4), ("ccc", 10)]
    assert_empty(s)


def test_without_chunked_prefill_a_long_prompt_waits_for_a_whole_step():
    s = make(max_num_batched_tokens=12, enable_chunked_prefill=False)
    s.add(request("a", 8))
    s.add(request("bb", 8))
    out = s.schedule()
    assert [x.request.request_id for x in out.scheduled] == ["a"]  # bb does not fit beside it, and is not split
    fake_step(s, out)
    run_to_completion(s)
    assert_empty(s)


def test_max_num_seqs_caps_running():
    s = make(max_num_seqs=2)
    for rid in ("a", "bb", "ccc"):
        s.add(request(rid, 3, max_tokens=5))
    out = s.schedule()
    assert len(out.scheduled) == 2 and len(s.waiting) == 1
    run_to_completion(s)
    assert_empty(s)


def test_preemption_recomputes_the_latest_request_and_nothing_leaks():
    # 6 blocks of 4 tokens; each request needs up to 3 blocks (8 prompt + 4 out), so three cannot all fit.
    s = make(num_blocks=6, block_size=4, max_num_batched_tokens=64)
    for i, rid in enumerate(("a", "bb", "ccc")):
        s.add(request(rid, 8, max_tokens=4, first_token=100 * i))
    outs = run_to_completion(s)
    preempted = [rid for o in outs for rid in o.preempted_ids]
    assert preempted and s.num_preemptions == len(preempted)
    assert "a" not in preempted  # FCFS: the latest running request gives its blocks back first
    assert_empty(s)


def test_priority_orders_waiting_and_preempts_the_least_urgent():
    s = make(num_blocks=6, block_size=4, max_num_seqs=1, policy="priority")
    s.add(request("low", 4, priority=5))
    s.add(request("urgent", 4, priority=-1))
    out = s.schedule()
    assert [x.request.request_id for x in out.scheduled] == ["urgent"]
    run_to_completion(s)
    assert_empty(s)


def test_kv_load_allocates_without_budget_then_runs_or_recomputes():
    s = make(max_num_batched_tokens=4)
    ok, bad = request("ok", 9), request("bad", 9)
    for req in (ok, bad):
        req.status = RequestStatus.WAITING_FOR_KV
        req.append_output(11)  # the first token sampled by the prefill instance
        s.add(req)
    out = s.schedule()
    assert [r.request_id for r, _, _ in out.kv_loads] == ["ok", "bad"] and not out.scheduled
    assert all(len(blocks) == 3 for _, _, blocks in out.kv_loads)  # 9 prompt tokens in 4-token blocks
    assert s.finish_kv_load("ok", ok=True) is ok and ok.status is RequestStatus.RUNNING
    assert ok.num_computed_tokens == ok.num_cached_tokens == ok.num_prompt_tokens
    assert s.finish_kv_load("bad", ok=False) is bad and bad.status is RequestStatus.WAITING
    out = s.schedule()
    # ok decodes its first token's successor at once; bad recomputes its prompt (and the first token) here
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("ok", 1), ("bad", 3)]
    assert bad.num_recomputed_tokens == 9
    fake_step(s, out)
    run_to_completion(s)
    assert_empty(s)


def test_prefix_hit_is_counted_once_even_when_admission_is_retried():
    s = make(num_blocks=5, block_size=4)
    s.add(request("a", 12, max_tokens=2))
    run_to_completion(s)  # a's 3 full blocks stay cached
    s.add(request("hog", 15, max_tokens=2, first_token=100))
    s.add(request("b", 12, max_tokens=2))  # same prompt as a: 2 cached blocks usable (last token recomputed)
    queries_before = s.kv.prefix_queries_tokens
    outs = run_to_completion(s)
    b_first = next(x for o in outs for x in o.scheduled if x.request.request_id == "b")
    assert b_first.num_new_tokens <= 12
    # hog's and b's lookups each counted exactly once, whatever the number of retries
    assert s.kv.prefix_queries_tokens - queries_before == 15 + 12
    assert_empty(s)


def test_a_failed_remote_load_of_a_split_pool_recomputes_from_fresh_blocks():
    """A pool split by layer group loads a sliding group's window only (null entries before it); a
    failed load frees every group's table, so the recompute writes real blocks from position 0."""
    from types import SimpleNamespace

    from splitserve.shared.kv.layer_groups import GroupedKVCacheManager

    kv = GroupedKVCacheManager([None, 6], [32, 12], block_size=4)
    s = Scheduler(SchedulerConfig(), kv)
    req = request("remote", 20)
    req.kv_transfer = SimpleNamespace(handle=object(), hold=False)
    req.status = RequestStatus.WAITING_FOR_KV
    req.append_output(11)
    s.add(req)
    (_, _, dst), = s.schedule().kv_loads
    sliding = kv.groups[1]
    assert [len(ids) for ids in dst] == [5, 2] and sliding.block_table("remote")[:3] == [sliding.null_block] * 3
    assert s.finish_kv_load("remote", ok=False) is req and not kv.block_table("remote")
    kv.check_integrity()
    out = s.schedule()
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("remote", 21)]
    assert sliding.null_block not in sliding.block_table("remote")
    fake_step(s, out)
    run_to_completion(s)
    assert s.num_unfinished == 0
    kv.check_integrity()
    assert kv.group_free_blocks() == [32, 11]


def test_a_cached_prefix_is_hashed_once_when_its_next_turn_is_admitted(monkeypatch):
    """The device lookup, the host tier's lookup and the hit's check in allocate_slots share one
    pass over the prompt's blocks (a retained turn's history is thousands of tokens)."""
    import splitserve.shared.kv.block_hash as block_hash

    asked = []
    s = Scheduler(SchedulerConfig(), KVCacheManager(64, 4), external_lookup=lambda hashes: asked.append(hashes) or 0)
    s.add(request("turn-1", 40, max_tokens=1))
    run_to_completion(s)  # its 10 full blocks stay cached
    hashed = []
    real = block_hash.hash_block_tokens
    monkeypatch.setattr(block_hash, "hash_block_tokens", lambda parent, ids: hashed.append(1) or real(parent, ids))
    turn_2 = request("turn-2", 40 + 12, max_tokens=1)  # the same 40 tokens, then 12 new ones
    s.add(turn_2)
    out = s.schedule()
    assert [x.num_new_tokens for x in out.scheduled] == [12] and turn_2.num_cached_tokens == 40
    assert len(hashed) == (52 - 1) // 4  # every full block before the last token, once
    assert len(asked[-1]) == 2  # the tier is asked only for the blocks past the device's hits
    fake_step(s, out)
    assert_empty(s)
