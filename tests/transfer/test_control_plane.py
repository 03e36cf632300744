"""The ZeroMQ control plane under hostile input: malformed, oversized, unsigned and forged
messages are dropped and counted, the task serving the socket keeps serving, nothing leaks, and
no transfer socket listens beyond the configured host. Real connector processes and sockets."""

from __future__ import annotations

import json
import time
import uuid

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitserve.shared.auth import control_key
from splitserve.shared.listening import listening_sockets
from splitserve.shared.transfer.control import MAX_MESSAGE_BYTES, ControlMessageError, decode, encode

from .conftest import CONTROL_KEY
from .peer import make_cache

pytestmark = pytest.mark.timeout(180)

_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                     max_leaves=8)
_LOAD_FIELDS = ("transfer_id", "request_id", "prefill_instance_id", "decode_instance_id", "layout_hash",
                "src_block_ids", "dst_block_ids", "tag", "data_address")


def _load(handle: dict, **overrides) -> dict:
    return {"type": "load", "transfer_id": uuid.uuid4().hex, "request_id": handle["request_id"],
            "prefill_instance_id": handle["instance_id"], "decode_instance_id": "forger",
            "layout_hash": handle["layout_hash"], "src_block_ids": handle["block_ids"],
            "dst_block_ids": list(range(len(handle["block_ids"]))), "tag": 1 << 16,
            "data_address": {"backend": "ucx", "worker_address": "00"}, **overrides}


@given(st.binary(max_size=300))
def test_decode_of_any_bytes_is_a_message_or_a_control_error(frame):
    for key in (None, CONTROL_KEY):
        try:
            decode(key, frame)
        except ControlMessageError:
            pass


@given(st.sampled_from(_LOAD_FIELDS), _JSON)
def test_a_signed_load_with_any_wrong_field_is_refused_by_name(field, value):
    msg = _load({"request_id": "r", "instance_id": "i", "layout_hash": "h", "block_ids": [1]})
    msg[field] = value
    try:
        checked = decode(CONTROL_KEY, encode(CONTROL_KEY, msg))
    except ControlMessageError as exc:
        assert field in str(exc)
    else:  # the value happened to be of the right type
        assert checked[field] == value


def test_signatures_bind_key_and_body():
    frame = encode(CONTROL_KEY, {"type": "done", "transfer_id": "t", "request_id": "r", "prefill_instance_id": "p"})
    assert decode(CONTROL_KEY, frame)["request_id"] == "r"
    for forged in (encode(None, json.loads(frame[32:])), encode(control_key(b"another-secret-of-the-same-size"),
                                                                 json.loads(frame[32:])),
                   frame[:32] + frame[32:].replace(b'"r"', b'"s"'), frame[32:]):
        with pytest.raises(ControlMessageError, match="MAC"):
            decode(CONTROL_KEY, forged)


def _hostile_frames():
    """What an attacker with a socket can send: lists of frames for one DEALER send_multipart."""
    signed_wrong = st.builds(lambda f, v: [encode(CONTROL_KEY, {**_load({"request_id": "h", "instance_id": "i",
                                                                        "layout_hash": "x", "block_ids": [1]}),
                                                               f: v})],
                             st.sampled_from(_LOAD_FIELDS), _JSON)
    return st.one_of(
        st.lists(st.binary(max_size=64), min_size=2, max_size=4),     # several frames
        st.binary(max_size=200).map(lambda b: [b]),                    # garbage
        signed_wrong,                                                  # signed, ill-typed
        _JSON.map(lambda v: [encode(CONTROL_KEY, {"type": "load", "request_id": v})]),
        _JSON.map(lambda v: [json.dumps({"v": 2, "type": "done", "request_id": v}).encode()]),  # unsigned
    )


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(_hostile_frames(), min_size=1, max_size=4))
def test_hostile_messages_never_stop_the_prefill_control_task(ucx_pair, batches):
    prefill, decode_peer = ucx_pair
    dropped_before = prefill.call("stats")["control_dropped"]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 5000)  # deliver everything before the socket goes
    sock.connect(prefill.info["control_address"])
    try:
        for frames in batches:
            sock.send_multipart(frames)
    finally:
        sock.close()
        ctx.term()
    if not all(_maybe_valid(f) for f in batches):
        wait_until(lambda: prefill.call("stats")["control_dropped"] > dropped_before, 20, message="drops counted")
    # The task behind the socket still serves: a real load right after them goes through.
    rid = f"after-{uuid.uuid4().hex[:8]}"
    handle = prefill.call("hold", rid, [40, 41], 20)
    decode_peer.call("start_load", rid, handle, [50, 51])
    assert rid in decode_peer.wait_events("loaded", [rid], timeout_s=20)["loaded"]
    assert rid in prefill.wait_events("released", [rid], timeout_s=20)["released"]
    stats = prefill.call("stats")
    assert stats["held"] == 0 and prefill.call("failure") is None


def wait_until(predicate, timeout_s: float, message: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{message} not reached within {timeout_s} s"
        time.sleep(0.05)


def _maybe_valid(frames) -> bool:
    try:
        return len(frames) == 1 and decode(CONTROL_KEY, frames[0])["type"] == "load"
    except ControlMessageError:
        return False


def test_oversized_unsigned_and_forged_loads_touch_no_hold(ucx_pair):
    prefill, _ = ucx_pair
    handle = prefill.call("hold", "guarded", [42], 10)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(handle["control_address"])
    try:
        forged_key = control_key(b"an-outsider-guessing-the-secret")
        sock.send(encode(forged_key, {"type": "done", "transfer_id": "t", "request_id": "guarded",
                                      "prefill_instance_id": handle["instance_id"]}))
        sock.send(encode(None, _load(handle)))
        sock.send(b"\0" * (MAX_MESSAGE_BYTES + 1))
        assert not sock.poll(1500), "a forged or oversized message was answered"
    finally:
        sock.close()
        ctx.term()
    assert "guarded" not in prefill.call("events")["released"]
    assert prefill.call("stats")["held"] >= 1
    prefill.call("abort", "guarded")
    assert "guarded" in prefill.wait_events("released", ["guarded"], timeout_s=10)["released"]
    assert prefill.call("failure") is None


def test_transfer_sockets_listen_on_the_configured_host_only(ucx_pair):
    for peer in ucx_pair:
        sockets = listening_sockets(peer.process.pid)
        assert sockets, "the peer listens on nothing?"
        assert {ip for ip, _ in sockets} == {"127.0.0.1"}, sockets


def test_data_moves_with_the_signed_addresses_only(ucx_pair):
    """An accepted load travels over endpoints made from addresses in signed messages."""
    prefill, decode_peer = ucx_pair
    handle = prefill.call("hold", "signed", [44], 10)
    decode_peer.call("start_load", "signed", handle, [55])
    assert "signed" in decode_peer.wait_events("loaded", ["signed"], timeout_s=20)["loaded"]
    import torch
    assert torch.equal(decode_peer.call("blocks", [55]), make_cache(prefill.seed)[[44]])


def test_a_dead_control_task_is_reported_as_a_failure():
    from .peer import Peer

    peer = Peer(9, role="prefill", backend="ucx", ucx_tls="tcp", model_id="tiny", secret=b"x" * 32).ready()
    try:
        assert peer.call("failure") is None
        peer.call("break_control")
        wait_until(lambda: peer.call("failure") is not None, 20, message="failure reported")
        assert "control task ended" in peer.call("failure")
    finally:
        peer.close()
