"""UCX over loopback TCP between two real processes: bit-exact blocks, coalescing, stale peers,
abort on both sides, concurrent loads. Control messages cross real ZMQ sockets."""

from __future__ import annotations

import time
import uuid

import pytest
import torch
import zmq

from splitserve.shared.transfer.control import decode, encode

from .conftest import CONTROL_KEY, DECODE_TIMEOUT_S
from .peer import BLOCK_BYTES, make_cache

pytestmark = pytest.mark.timeout(60)

SRC, DST = [3, 4, 5, 9, 20], [10, 11, 40, 41, 42]


def _assert_only_blocks_changed(before: torch.Tensor, after: torch.Tensor, changed: list[int]) -> None:
    keep = [b for b in range(before.shape[0]) if b not in changed]
    assert torch.equal(before[keep], after[keep]), "blocks outside the dst list were written"


def test_blocks_land_bit_exact_and_adjacent_runs_coalesce(ucx_pair):
    prefill, decode = ucx_pair
    before, stats0 = decode.call("cache"), decode.call("stats")
    handle = prefill.call("hold", "exact", SRC, 5 * 16 - 3)
    decode.call("start_load", "exact", handle, DST)

    events = decode.wait_events("loaded", ["exact"], timeout_s=10)
    assert "exact" in events["loaded"], events
    assert events["loaded_bytes"]["exact"] == len(SRC) * BLOCK_BYTES
    after = decode.call("cache")
    assert torch.equal(after[DST], make_cache(prefill.seed)[SRC])
    _assert_only_blocks_changed(before, after, DST)

    released = prefill.wait_events("released", ["exact"], timeout_s=10)
    assert "exact" in released["released"]
    assert released["sent_bytes"]["exact"] == len(SRC) * BLOCK_BYTES
    stats = decode.call("stats")
    assert stats["bytes_received"] - stats0["bytes_received"] == len(SRC) * BLOCK_BYTES
    # (3,4)->(10,11) is adjacent on both sides; 5->40, 9->41, 20->42 are not: 4 messages, 5 blocks
    assert stats["runs_received"] - stats0["runs_received"] == 4
    assert stats["blocks_received"] - stats0["blocks_received"] == 5


def test_many_concurrent_loads_all_complete(ucx_pair):
    prefill, decode = ucx_pair
    ids = [f"many-{i}" for i in range(16)]
    handles = {rid: prefill.call("hold", rid, [2 * i, 2 * i + 1], 32) for i, rid in enumerate(ids)}
    dst = {rid: [63 - 2 * i, 62 - 2 * i] for i, rid in enumerate(ids)}  # reversed: no coalescing
    for rid in ids:
        decode.call("start_load", rid, handles[rid], dst[rid])
    events = decode.wait_events("loaded", ids, timeout_s=20)
    assert set(ids) <= set(events["loaded"]), events["load_failed"]
    after, src = decode.call("cache"), make_cache(prefill.seed)
    for i, rid in enumerate(ids):
        assert torch.equal(after[dst[rid]], src[[2 * i, 2 * i + 1]]), rid
    assert set(ids) <= set(prefill.wait_events("released", ids, timeout_s=10)["released"])


def test_handle_from_a_restarted_prefill_is_rejected_and_writes_nothing(ucx_pair):
    prefill, decode = ucx_pair
    before = decode.call("cache")
    handle = prefill.call("hold", "stale", [30, 31], 20)
    stale = {**handle, "instance_id": str(uuid.uuid4())}
    decode.call("start_load", "stale", stale, [50, 51])
    events = decode.wait_events("load_failed", ["stale"], timeout_s=10)
    reason = dict(map(tuple, events["load_failed"]))["stale"]
    assert "unknown prefill instance_id" in reason and stale["instance_id"] in reason
    assert torch.equal(decode.call("cache"), before)
    # the hold belongs to the live instance and stays held (until its lease): a correct handle works
    decode.call("start_load", "stale-retry", handle, [50, 51])
    assert "stale-retry" in decode.wait_events("loaded", ["stale-retry"], timeout_s=10)["loaded"]


def test_layout_mismatch_fails_the_load_and_releases_the_hold(ucx_pair):
    prefill, decode = ucx_pair
    before = decode.call("cache")
    handle = prefill.call("hold", "layout", [32, 33], 20)
    decode.call("start_load", "layout", {**handle, "layout_hash": "0" * 24}, [52, 53])
    events = decode.wait_events("load_failed", ["layout"], timeout_s=10)
    assert "layout hash mismatch" in dict(map(tuple, events["load_failed"]))["layout"]
    assert torch.equal(decode.call("cache"), before)
    # the decode side tells the prefill side, which frees the blocks now rather than at lease end
    assert "layout" in prefill.wait_events("released", ["layout"], timeout_s=2)["released"]


def _raw_load(control_address: str, handle: dict, **overrides) -> dict:
    """A hand-written decode side: one DEALER, one load message, the prefill's reply."""
    msg = {"type": "load", "transfer_id": uuid.uuid4().hex, "request_id": handle["request_id"],
           "prefill_instance_id": handle["instance_id"], "decode_instance_id": "raw",
           "layout_hash": handle["layout_hash"], "src_block_ids": handle["block_ids"],
           "dst_block_ids": [0] * len(handle["block_ids"]), "tag": 1 << 16,
           "data_address": {"backend": "ucx", "worker_address": "00"}, **overrides}
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(control_address)
    try:
        sock.send(encode(CONTROL_KEY, msg))
        assert sock.poll(5000), "prefill did not answer"
        return decode(CONTROL_KEY, sock.recv())
    finally:
        sock.close()
        ctx.term()


def test_prefill_rejects_mismatched_layout_and_foreign_instance(ucx_pair):
    prefill, _ = ucx_pair
    handle = prefill.call("hold", "raw", [34, 35], 20)
    reply = _raw_load(handle["control_address"], handle, prefill_instance_id="someone-else")
    assert reply["type"] == "rejected" and "unknown prefill instance_id" in reply["reason"]
    reply = _raw_load(handle["control_address"], handle, data_address={"backend": "nccl", "rank": 1})
    assert reply["type"] == "rejected" and "backend mismatch" in reply["reason"]
    reply = _raw_load(handle["control_address"], handle, src_block_ids=[34, 36])
    assert reply["type"] == "rejected" and "differ from the held" in reply["reason"]
    assert "raw" not in prefill.call("events")["released"]  # none of these touched the hold
    reply = _raw_load(handle["control_address"], handle, layout_hash="f" * 24)
    assert reply["type"] == "rejected" and "layout hash mismatch" in reply["reason"]
    assert "raw" in prefill.wait_events("released", ["raw"], timeout_s=2)["released"]


def test_abort_before_the_load_task_begins_still_ends_in_one_event(ucx_pair):
    """An abort that runs before the load's task has taken its first step (both land in one loop
    turn) still ends the load in load_failed 'aborted' and frees the prefill's hold. A task
    cancelled before it begins never runs its cleanup, which once left such a load with no event
    (and the engine's dst blocks allocated for good)."""
    prefill, decode = ucx_pair
    rid = "abort-before-start"
    handle = prefill.call("hold", rid, [44, 45], 20)
    decode.call("start_then_abort", rid, handle, [60, 61])
    events = decode.wait_events("load_failed", [rid], timeout_s=5)
    assert (rid, "aborted") in map(tuple, events["load_failed"]) and rid not in events["loaded"]
    assert rid in prefill.wait_events("released", [rid], timeout_s=5)["released"]


@pytest.mark.parametrize("abort_delay_s", [0.0, 0.002, 0.02, 0.2])
def test_abort_on_the_decode_side_reports_failure_and_frees_the_prefill_hold(ucx_pair, abort_delay_s):
    """Whether the abort lands before the load is sent, while the prefill side accepts it, or after
    the data landed: exactly one outcome, load_failed 'aborted', and the prefill frees its blocks
    well before its own send timeout (an accepted load is drained, not left hanging)."""
    prefill, decode = ucx_pair
    rid = f"abort-d-{abort_delay_s}"
    handle = prefill.call("hold", rid, [36, 37, 38], 40)
    decode.call("start_load", rid, handle, [54, 55, 56])
    time.sleep(abort_delay_s)
    t0 = time.monotonic()
    decode.call("abort", rid)
    events = decode.wait_events("load_failed", [rid], timeout_s=DECODE_TIMEOUT_S + 5)
    assert (rid, "aborted") in map(tuple, events["load_failed"])
    assert rid not in events["loaded"]  # exactly one outcome per request
    assert rid in prefill.wait_events("released", [rid], timeout_s=5)["released"]
    assert time.monotonic() - t0 < 2.5


def test_abort_on_the_prefill_side_releases_and_later_loads_are_rejected(ucx_pair):
    prefill, decode = ucx_pair
    handle = prefill.call("hold", "abort-p", [39], 10)
    t0 = time.monotonic()
    prefill.call("abort", "abort-p")
    assert "abort-p" in prefill.wait_events("released", ["abort-p"], timeout_s=2)["released"]
    assert time.monotonic() - t0 < 1.5
    decode.call("start_load", "abort-p", handle, [57])
    events = decode.wait_events("load_failed", ["abort-p"], timeout_s=10)
    assert "is not held here" in dict(map(tuple, events["load_failed"]))["abort-p"]


def test_bad_engine_calls_raise_specific_errors(ucx_pair):
    prefill, decode = ucx_pair
    handle = prefill.call("hold", "bad", [40, 41], 20)
    with pytest.raises(RuntimeError, match="2 src blocks"):
        decode.call("start_load", "bad", handle, [58])
    with pytest.raises(RuntimeError, match="out of range"):
        decode.call("start_load", "bad", handle, [58, 64])
    with pytest.raises(RuntimeError, match="already held"):
        prefill.call("hold", "bad", [42], 5)
    with pytest.raises(RuntimeError, match="do not fit"):
        prefill.call("hold", "bad2", [42], 17)
    with pytest.raises(RuntimeError, match="needs role 'prefill'"):
        decode.call("hold", "bad3", [1], 1)
    prefill.call("abort", "bad")


def test_one_load_wakes_the_decode_engine_before_done_and_the_prefill_engine_at_release(ucx_pair):
    """The hand-off's sequence on each side's loop: decode sends `load`; prefill answers `accepted`;
    decode queues `loaded` and wakes its engine, and only then sends `done`; prefill queues
    `released` and wakes its engine."""
    prefill, decode = ucx_pair
    prefill.call("record"), decode.call("record")
    handle = prefill.call("hold", "sequence", [6, 7], 20)
    decode.call("start_load", "sequence", handle, [30, 50])
    assert "sequence" in decode.wait_events("loaded", ["sequence"], timeout_s=10)["loaded"]
    assert "sequence" in prefill.wait_events("released", ["sequence"], timeout_s=10)["released"]

    on_decode, on_prefill = decode.call("record"), prefill.call("record")
    ours = [e for e in on_decode if e[1:] == ("sequence",)]
    assert ours == [("load", "sequence"), ("loaded", "sequence"), ("done", "sequence")], on_decode
    assert on_decode[on_decode.index(("loaded", "sequence")) + 1] == ("wake",), on_decode
    released = on_prefill.index(("released", "sequence"))
    assert on_prefill[released + 1] == ("wake",), on_prefill
    assert [e[0] for e in on_prefill[:released] if e[0] == "accepted"] == ["accepted"], on_prefill
