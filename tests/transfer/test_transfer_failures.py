"""Peers that never answer, never send, or never come: every load and every hold ends in an
event within its deadline, never in a hang. Real processes and sockets throughout."""

from __future__ import annotations

import socket
import time
import uuid

import pytest
import torch

from .conftest import CONTROL_KEY, DECODE_TIMEOUT_S, PREFILL_LEASE_S, TEST_SECRET
from .fake_prefill import FakePrefill

pytestmark = pytest.mark.timeout(60)
MARGIN_S = 2.5  # cancellation grace + a loaded 2-core box


def _handle(control_address: str, layout: str, block_ids=(1, 2)) -> dict:
    return {"version": 1, "instance_id": str(uuid.uuid4()), "request_id": "x", "block_ids": list(block_ids),
            "num_tokens": 16 * len(block_ids), "layout_hash": layout, "control_address": control_address}


def _reason(events: dict, rid: str) -> str:
    return dict(map(tuple, events["load_failed"]))[rid]


def test_control_address_nobody_serves_fails_within_timeout(ucx_pair):
    _, decode = ucx_pair
    with socket.socket() as dead:  # bound and listening, but nothing ever accepts or answers
        dead.bind(("127.0.0.1", 0))
        dead.listen(1)
        address = f"tcp://127.0.0.1:{dead.getsockname()[1]}"
        t0 = time.monotonic()
        decode.call("start_load", "dead", _handle(address, decode.info["layout_hash"]), [1, 2])
        events = decode.wait_events("load_failed", ["dead"], timeout_s=DECODE_TIMEOUT_S + MARGIN_S)
        elapsed = time.monotonic() - t0
    assert "did not answer" in _reason(events, "dead")
    assert DECODE_TIMEOUT_S * 0.9 <= elapsed <= DECODE_TIMEOUT_S + MARGIN_S


def test_prefill_that_accepts_but_never_sends_fails_and_writes_nothing(ucx_pair):
    _, decode = ucx_pair
    fake = FakePrefill("no_data", key=CONTROL_KEY).ready()
    try:
        before = decode.call("cache")
        t0 = time.monotonic()
        decode.call("start_load", "mute", _handle(fake.control_address, decode.info["layout_hash"]), [5, 6])
        events = decode.wait_events("load_failed", ["mute"], timeout_s=DECODE_TIMEOUT_S + MARGIN_S)
        assert time.monotonic() - t0 <= DECODE_TIMEOUT_S + MARGIN_S
        assert "timed out" in _reason(events, "mute")
        assert torch.equal(decode.call("cache"), before)
        outcome = [m for m in fake.seen() if m["type"] == "failed"]
        assert outcome and outcome[0]["request_id"] == "x"  # the decode side told the prefill side
    finally:
        fake.close()


def test_abort_while_the_prefill_is_silent_is_immediate(ucx_pair):
    _, decode = ucx_pair
    fake = FakePrefill("silent", key=CONTROL_KEY).ready()
    try:
        decode.call("start_load", "hush", _handle(fake.control_address, decode.info["layout_hash"]), [7, 8])
        time.sleep(0.1)
        t0 = time.monotonic()
        decode.call("abort", "hush")
        events = decode.wait_events("load_failed", ["hush"], timeout_s=DECODE_TIMEOUT_S)
        assert _reason(events, "hush") == "aborted"
        assert time.monotonic() - t0 < 1.0
        assert [m["type"] for m in fake.seen()][:1] == ["load"]
    finally:
        fake.close()


def test_hold_nobody_loads_is_released_when_its_lease_ends(ucx_pair):
    prefill, _ = ucx_pair
    t0 = time.monotonic()
    prefill.call("hold", "orphan", [60, 61], 20)
    events = prefill.wait_events("released", ["orphan"], timeout_s=PREFILL_LEASE_S + MARGIN_S)
    elapsed = time.monotonic() - t0
    assert "orphan" in events["released"] and events["sent_bytes"]["orphan"] == 0
    assert PREFILL_LEASE_S * 0.9 <= elapsed <= PREFILL_LEASE_S + MARGIN_S


def test_restarted_prefill_on_the_same_address_is_a_new_peer(ucx_pair):
    """Kill a prefill mid-life and start another on its control port: handles of the old one are
    rejected by name, and the decode side's cached control and UCX connections move on cleanly."""
    _, decode = ucx_pair
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from .peer import Peer, make_cache
    common = dict(role="prefill", ucx_tls="tcp", model_id="tiny", control_port=port, timeout_s=5, lease_s=10,
                  secret=TEST_SECRET)
    first = Peer(5, **common).ready()
    try:
        old = first.call("hold", "gen1", [1], 16)
        decode.call("start_load", "gen1", old, [20])
        assert "gen1" in decode.wait_events("loaded", ["gen1"], timeout_s=10)["loaded"]
        orphan = first.call("hold", "gen1-orphan", [2], 16)
    finally:
        first.process.kill()  # a crash: no close(), no goodbye
        first.process.join(timeout=10)
    second = Peer(6, **common).ready()
    try:
        assert second.info["control_address"] == old["control_address"]
        decode.call("start_load", "gen1-orphan", orphan, [21])
        events = decode.wait_events("load_failed", ["gen1-orphan"], timeout_s=10)
        assert "unknown prefill instance_id" in _reason(events, "gen1-orphan")
        new = second.call("hold", "gen2", [3, 4], 32)
        decode.call("start_load", "gen2", new, [22, 23])
        events = decode.wait_events("loaded", ["gen2"], timeout_s=10)
        assert "gen2" in events["loaded"], events["load_failed"]
        assert torch.equal(decode.call("blocks", [22, 23]), make_cache(6)[[3, 4]])
    finally:
        second.close()
