"""KV transfer of a pool split by KV layer group: handles and layouts that carry the groups, runs
coalesced per group, the block spans each side hands out / allocates, and real transfers between
processes (gloo standing in for NCCL; UCX over loopback) that move each group's blocks into its own
pool, or refuse a peer whose group layout differs by name."""

from __future__ import annotations

import socket

import pytest
import torch

from splitserve.shared.kv.layer_groups import GroupedKVCacheManager
from splitserve.shared.protocol import convert
from splitserve.shared.transfer import KvHandle, KvHandleError, KvLayout, layout_hash, layout_mismatch
from splitserve.shared.transfer.block_runs import BlockRun, GroupRun, group_runs

from .conftest import TEST_SECRET
from .peer import LAYER_BLOCK_BYTES, WINDOW, Peer, make_cache

pytestmark = pytest.mark.timeout(120)

ONE_POOL = KvLayout("tiny", "float32", 16, 2, 2, 8, tensor_parallel_size=1, kv_heads_per_rank=2)
SPLIT = KvLayout("tiny", "float32", 16, 2, 2, 8, tensor_parallel_size=1, kv_heads_per_rank=2,
                 kv_groups=((None, (1,)), (WINDOW, (0,))), group_num_blocks=(64, 24))


def _handle(**overrides) -> KvHandle:
    fields = dict(version=1, instance_id="i", request_id="r", block_ids=(), num_tokens=40, layout_hash="h",
                  control_address="tcp://127.0.0.1:1", groups=((3, 4, 5), (7, 8)))
    return KvHandle(**{**fields, **overrides})


def test_a_split_handle_round_trips_through_a_dict_and_the_proto():
    h = _handle()
    assert KvHandle.from_dict(h.to_dict()) == h
    assert convert.kv_handle_from_proto(convert.kv_handle_to_proto(h)) == h
    assert h.block_lists() == [(3, 4, 5), (7, 8)] and h.num_blocks == 5
    one_pool = _handle(block_ids=(1, 2), groups=())
    assert one_pool.block_lists() == [(1, 2)]
    assert convert.kv_handle_from_proto(convert.kv_handle_to_proto(one_pool)) == one_pool


@pytest.mark.parametrize("groups, message", [
    ([[1], [2, -1]], "groups\\[1\\]"), ("1,2", "'groups' has type str"), ([[1], "x"], "groups\\[1\\]"),
])
def test_a_bad_group_list_is_refused_by_name(groups, message):
    d = _handle().to_dict()
    d["groups"] = groups
    with pytest.raises(KvHandleError, match=message):
        KvHandle.from_dict(d)


def test_a_handle_with_both_one_pool_and_group_blocks_is_refused():
    with pytest.raises(KvHandleError, match="both 'block_ids'"):
        KvHandle.from_dict(_handle(block_ids=(1,)).to_dict())


def test_the_group_layout_round_trips_and_enters_the_wire_hash():
    assert KvLayout.from_dict(SPLIT.to_dict()) == SPLIT
    assert ONE_POOL.wire_hash() == layout_hash("tiny", "float32", 16, 2, 2, 8)  # as before groups existed
    other_window = KvLayout(**{**SPLIT.__dict__, "kv_groups": ((None, (1,)), (WINDOW + 1, (0,)))})
    assert len({ONE_POOL.wire_hash(), SPLIT.wire_hash(), other_window.wire_hash()}) == 3
    resized = KvLayout(**{**SPLIT.__dict__, "group_num_blocks": (10, 10)})  # each side sizes its own pools
    assert resized.wire_hash() == SPLIT.wire_hash() and layout_mismatch(SPLIT, resized) is None
    with pytest.raises(KvHandleError, match="kv_groups"):
        KvLayout.from_dict({**SPLIT.to_dict(), "kv_groups": [["6", [0]]]})


def test_a_group_layout_mismatch_is_named():
    reason = layout_mismatch(SPLIT, ONE_POOL)
    assert "kv_groups prefill" in reason and "vs decode ()" in reason
    assert "split by layer group: full (1 layers, 64 blocks), window 20 (1 layers, 24 blocks)" in reason
    assert "in one pool" in reason


def test_runs_coalesce_within_each_group_only():
    runs = group_runs([[3, 4], [5, 6]], [[10, 11], [12, 13]])
    assert runs == [GroupRun(0, BlockRun(3, 10, 2)), GroupRun(1, BlockRun(5, 12, 2))]
    with pytest.raises(ValueError, match="2 src block groups but 1 dst"):
        group_runs([[1], [2]], [[1]])


def test_prefill_hands_out_and_decode_allocates_the_same_per_group_spans():
    """A 30-token prompt, blocks of 4, window 6: the full group needs blocks 0..7, the sliding group
    only blocks 6..7 (keys from 25 on); the decode side's sliding table heads with null entries."""
    tokens = list(range(100, 130))
    prefill = GroupedKVCacheManager([None, 6], [16, 9], block_size=4)  # a whole chunk's blocks
    decode = GroupedKVCacheManager([None, 6], [16, 3], block_size=4)  # the window's two, and the null block
    prefill.allocate_slots("a", tokens, 0, 30)
    prefill.cache_computed_blocks("a", tokens, 30)
    assert prefill.release_out_of_window("a", 30) == 6
    held = prefill.prompt_block_ids("a", 30)
    assert [len(ids) for ids in held] == [8, 2] and prefill.groups[1].null_block not in held[1]
    dst = decode.allocate_load_slots("b", tokens + [7], 30)
    assert [len(ids) for ids in dst] == [8, 2]
    sliding = decode.groups[1]
    assert sliding.block_table("b")[:6] == [sliding.null_block] * 6 and sliding.block_table("b")[6:] == dst[1]
    decode.cache_computed_blocks("b", tokens + [7], 30)  # what the engine does once the load landed
    decode.check_integrity()
    assert decode.allocate_load_slots("c", tokens, 30) is None  # the sliding pool is used up
    assert not decode.groups[0].block_table("c")  # a short group changed nothing
    for kv, rid, free in ((prefill, "a", [16, 8]), (decode, "b", [16, 2])):
        kv.free(rid)
        kv.check_integrity()
        assert kv.group_free_blocks() == free


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gloo_moves_each_groups_blocks_into_its_own_pool():
    init = f"tcp://127.0.0.1:{_free_port()}"
    common = dict(backend="nccl", nccl_init_method=init, timeout_s=10, lease_s=10, model_id="tiny", split=True)
    prefill = Peer(5, role="prefill", nccl_rank=0, **common)
    decode = Peer(6, role="decode", nccl_rank=1, **common)
    try:
        prefill.ready(), decode.ready()
        before, src = decode.call("cache"), make_cache(5, split=True)
        src_groups, dst_groups = [[3, 4, 5, 9], [20, 21]], [[10, 11, 40, 41], [2, 7]]
        handle = prefill.call("hold", "g", src_groups, 16 * 4 - 3)
        assert handle["block_ids"] == [] and handle["groups"] == src_groups
        decode.call("start_load", "g", handle, dst_groups)
        events = decode.wait_events("loaded", ["g"], timeout_s=30)
        assert "g" in events["loaded"], events["load_failed"]
        assert events["loaded_bytes"]["g"] == 6 * LAYER_BLOCK_BYTES  # 6 one-layer blocks, not 4 two-layer ones
        after = decode.call("cache")
        for pool, (src_ids, dst_ids) in enumerate(zip(src_groups, dst_groups)):
            assert torch.equal(after[pool][dst_ids], src[pool][src_ids]), pool
            keep = [b for b in range(after[pool].shape[0]) if b not in dst_ids]
            assert torch.equal(after[pool][keep], before[pool][keep]), pool
        assert "g" in prefill.wait_events("released", ["g"], timeout_s=10)["released"]
        stats = decode.call("stats")
        # group 0: (3,4)->(10,11), 5->40, 9->41; group 1: 20->2, 21->7 (not adjacent on the dst side)
        assert (stats["runs_received"], stats["blocks_received"]) == (5, 6)
    finally:
        prefill.close()
        decode.close()


def test_a_split_prefill_and_a_one_pool_decode_refuse_each_other_by_name(ucx_pair):
    _, decode = ucx_pair
    prefill = Peer(7, role="prefill", backend="ucx", ucx_tls="tcp", model_id="tiny", timeout_s=5, lease_s=30,
                   secret=TEST_SECRET, split=True).ready()
    try:
        handle = prefill.call("hold", "mixed", [[1, 2], [3]], 20)
        decode.call("start_load", "mixed", handle, [30, 31])
        failed = dict(decode.wait_events("load_failed", ["mixed"], timeout_s=20)["load_failed"])
        assert "kv_groups prefill" in failed["mixed"] and "vs decode ()" in failed["mixed"], failed
        # The decode side's `failed` frees the hold at once, long before its 30 s lease.
        assert "mixed" in prefill.wait_events("released", ["mixed"], timeout_s=10)["released"]
    finally:
        prefill.close()
