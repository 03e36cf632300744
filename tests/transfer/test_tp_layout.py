"""P/D across tensor-parallel sizes: the layout check of the handshake, and the head bookkeeping
that turns N ranks' shards into whole-head blocks and back (shared/parallel/kv_shards.py).
The real collectives run in tests/services/test_stack_pd_tensor_parallel.py."""

from __future__ import annotations

import uuid

import pytest
import torch

from splitserve.shared.parallel.kv_shards import head_shards, whole_heads
from splitserve.shared.transfer import KvLayout, layout_mismatch

from .conftest import TEST_SECRET
from .peer import Peer
from .test_ucx_transfer import _raw_load

TP1 = KvLayout("tiny", "float32", 16, 2, 4, 8, tensor_parallel_size=1, kv_heads_per_rank=4)
TP2 = KvLayout("tiny", "float32", 16, 2, 4, 8, tensor_parallel_size=2, kv_heads_per_rank=2)


def test_layouts_at_different_tensor_parallel_sizes_are_compatible_and_share_the_wire_hash():
    assert layout_mismatch(TP2, TP1) is None and layout_mismatch(TP1, TP2) is None
    assert TP1.wire_hash() == TP2.wire_hash()
    tp8 = KvLayout("tiny", "float32", 16, 2, 4, 8, tensor_parallel_size=8, kv_heads_per_rank=1)  # replicated heads
    assert layout_mismatch(tp8, TP1) is None


@pytest.mark.parametrize("field,value", [("model_id", "other"), ("dtype", "bfloat16"), ("block_size", 32),
                                         ("num_layers", 3), ("num_kv_heads", 2), ("head_dim", 16)])
def test_a_wire_field_that_differs_is_refused_naming_both_sides_values(field, value):
    decode = KvLayout(**{**TP1.to_dict(), field: value, "kv_heads_per_rank": 2 if field == "num_kv_heads" else 4})
    reason = layout_mismatch(TP2, decode)
    assert reason is not None and f"{field} prefill {getattr(TP2, field)!r} vs decode {value!r}" in reason
    assert "prefill holds 2 rank(s) x 2 of 4 kv heads" in reason


def test_a_head_split_that_cannot_exist_is_refused():
    odd = KvLayout("tiny", "float32", 16, 2, 4, 8, tensor_parallel_size=3, kv_heads_per_rank=1)
    assert "decode side: num_kv_heads 4 and tensor_parallel_size 3 do not divide" in layout_mismatch(TP1, odd)
    wrong = KvLayout("tiny", "float32", 16, 2, 4, 8, tensor_parallel_size=2, kv_heads_per_rank=4)
    assert "prefill side: kv_heads_per_rank 4 is not 2" in layout_mismatch(wrong, TP1)


@pytest.mark.parametrize("num_kv_heads,world_size", [(4, 2), (4, 4), (2, 4), (1, 2), (3, 1)])
def test_shards_join_to_whole_heads_and_split_back(num_kv_heads, world_size):
    blocks = torch.randn(3, 2, 2, 4, num_kv_heads, 8)
    shards = head_shards(blocks, world_size)
    assert len(shards) == world_size and all(s.shape[4] == max(1, num_kv_heads // world_size) for s in shards)
    for rank, shard in enumerate(shards):  # rank r holds the heads its q heads read (kv_head_slice)
        first = rank * num_kv_heads // world_size
        assert torch.equal(shard, blocks[:, :, :, :, first:first + shard.shape[4]])
    assert torch.equal(whole_heads(shards, num_kv_heads), blocks)


def test_a_load_whose_layout_differs_is_rejected_at_the_prefill_naming_both_sides(ucx_pair):
    prefill, _ = ucx_pair
    handle = prefill.call("hold", "tp-layout", [40, 41], 20)
    theirs = {**TP1.to_dict(), "model_id": "tiny", "num_kv_heads": 2, "kv_heads_per_rank": 2, "dtype": "bfloat16"}
    reply = _raw_load(handle["control_address"], handle, layout=theirs, transfer_id=uuid.uuid4().hex)
    assert reply["type"] == "rejected"
    assert "dtype prefill 'float32' vs decode 'bfloat16'" in reply["reason"]
    assert "tp-layout" in prefill.wait_events("released", ["tp-layout"], timeout_s=5)["released"]


def test_a_decode_of_another_model_refuses_the_handle_naming_both_sides_values(ucx_pair):
    """The handle's layout hash is not the decode side's: it asks the prefill for its layout, fails
    the load with both sides' values, and the prefill frees the hold at once."""
    prefill, _ = ucx_pair
    other = Peer(3, role="decode", backend="ucx", ucx_tls="tcp", model_id="other-model", timeout_s=5.0,
                 secret=TEST_SECRET).ready()
    try:
        handle = prefill.call("hold", "other-model", [42, 43], 20)
        other.call("start_load", "other-model", handle, [10, 11])
        events = other.wait_events("load_failed", ["other-model"], timeout_s=15)
        reason = dict(map(tuple, events["load_failed"]))["other-model"]
        assert "layout hash mismatch" in reason and "model_id prefill 'tiny' vs decode 'other-model'" in reason
        assert "other-model" in prefill.wait_events("released", ["other-model"], timeout_s=5)["released"]
    finally:
        other.close()
