"""KvHandle round trip and validation, layout hashes, run coalescing, config checks."""

from __future__ import annotations

import pytest

from splitserve.shared.transfer import KvHandle, KvHandleError, TransferConfig, layout_hash
from splitserve.shared.transfer.block_runs import BlockRun, coalesce_runs


def _handle(**overrides) -> KvHandle:
    fields = dict(version=1, instance_id="i", request_id="r", block_ids=(3, 4), num_tokens=20,
                  layout_hash="h", control_address="tcp://127.0.0.1:1")
    return KvHandle(**{**fields, **overrides})


def test_handle_round_trips_through_a_plain_dict():
    h = _handle()
    d = h.to_dict()
    assert d["block_ids"] == [3, 4] and isinstance(d["block_ids"], list)
    assert KvHandle.from_dict(d) == h


@pytest.mark.parametrize("field, value, message", [
    ("num_tokens", "20", "num_tokens"), ("block_ids", [1, -2], "block_ids"),
    ("instance_id", None, "instance_id"), ("num_tokens", -1, "negative"),
])
def test_handle_from_dict_names_the_bad_field(field, value, message):
    d = _handle().to_dict()
    d[field] = value
    with pytest.raises(KvHandleError, match=message):
        KvHandle.from_dict(d)
    del d[field]
    with pytest.raises(KvHandleError, match=f"lacks field '{field}'"):
        KvHandle.from_dict(d)


def test_layout_hash_changes_with_every_field():
    base = ("m", "float32", 16, 2, 2, 8)
    hashes = {layout_hash(*base)}
    for i, other in enumerate(("m2", "bfloat16", 32, 3, 4, 16)):
        args = list(base)
        args[i] = other
        hashes.add(layout_hash(*args))
    assert len(hashes) == 7
    assert layout_hash(*base) == layout_hash(*base)


def test_runs_merge_only_where_both_sides_are_adjacent():
    assert coalesce_runs([3, 4, 5, 9, 20], [10, 11, 40, 41, 42]) == [
        BlockRun(3, 10, 2), BlockRun(5, 40, 1), BlockRun(9, 41, 1), BlockRun(20, 42, 1)]
    assert coalesce_runs([0, 1, 2], [7, 8, 9]) == [BlockRun(0, 7, 3)]
    assert coalesce_runs([2, 1], [5, 6]) == [BlockRun(2, 5, 1), BlockRun(1, 6, 1)]
    assert coalesce_runs([], []) == []
    with pytest.raises(ValueError, match="2 src blocks but 1 dst"):
        coalesce_runs([1, 2], [1])


@pytest.mark.parametrize("kwargs, message", [
    ({"backend": "tcp"}, "backend"), ({"role": "router"}, "role"), ({"timeout_s": 0}, "timeout_s"),
    ({"backend": "nccl", "nccl_init_method": "", "nccl_rank": 0, "role": "decode"}, "nccl_init_method"),
    ({"backend": "nccl", "nccl_init_method": "tcp://h:1", "nccl_rank": 2, "role": "decode"}, "rank"),
    ({"backend": "nccl", "nccl_init_method": "tcp://h:1", "nccl_rank": 0}, "role 'prefill' or 'decode'"),
])
def test_config_validation_names_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TransferConfig(**kwargs).validate()


def test_the_prompts_block_hashes_round_trip_through_a_dict_and_the_proto():
    from splitserve.shared.protocol import convert

    h = _handle(block_hashes=(b"\x01" * 16, b"\x02" * 16))
    assert KvHandle.from_dict(h.to_dict()) == h
    assert convert.kv_handle_from_proto(convert.kv_handle_to_proto(h)) == h


def test_a_handle_from_a_peer_without_block_hashes_has_none():
    from splitserve.shared.protocol import convert

    old_peer = convert.pb.KvHandle(version=1, instance_id="i", request_id="r", block_ids=[3, 4], num_tokens=20,
                                   layout_hash="h", control_address="tcp://127.0.0.1:1")
    assert convert.kv_handle_from_proto(old_peer).block_hashes == ()


@pytest.mark.parametrize("value", [["ab"], [b""], "ab", [b"\x01", 3]])
def test_block_hashes_that_are_not_bytes_are_refused_by_name(value):
    d = _handle().to_dict()
    d["block_hashes"] = value
    with pytest.raises(KvHandleError, match="block_hashes"):
        KvHandle.from_dict(d)
