"""The NCCL backend's code path between two processes, with gloo standing in on CPU tensors."""

from __future__ import annotations

import socket

import pytest
import torch

from .peer import Peer, make_cache

pytestmark = pytest.mark.timeout(90)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gloo_point_to_point_moves_blocks_bit_exact():
    init = f"tcp://127.0.0.1:{_free_port()}"
    common = dict(backend="nccl", nccl_init_method=init, timeout_s=10, lease_s=10, model_id="tiny")
    prefill = Peer(3, role="prefill", nccl_rank=0, **common)
    decode = Peer(4, role="decode", nccl_rank=1, **common)
    try:
        prefill.ready(), decode.ready()
        before, src = decode.call("cache"), make_cache(3)
        loads = {"g1": ([3, 4, 5, 9, 20], [10, 11, 40, 41, 42]), "g2": ([0, 1], [2, 3]),
                 "g3": ([7, 6], [62, 63])}
        for rid, (src_ids, dst_ids) in loads.items():  # queued together; the backend serializes
            handle = prefill.call("hold", rid, src_ids, 16 * len(src_ids))
            decode.call("start_load", rid, handle, dst_ids)
        events = decode.wait_events("loaded", list(loads), timeout_s=30)
        assert set(loads) <= set(events["loaded"]), events["load_failed"]
        after = decode.call("cache")
        written = [b for _, dst_ids in loads.values() for b in dst_ids]
        for rid, (src_ids, dst_ids) in loads.items():
            assert torch.equal(after[dst_ids], src[src_ids]), rid
        keep = [b for b in range(after.shape[0]) if b not in written]
        assert torch.equal(after[keep], before[keep])
        assert set(loads) <= set(prefill.wait_events("released", list(loads), timeout_s=10)["released"])
        assert decode.call("stats")["runs_received"] == 4 + 1 + 2
    finally:
        prefill.close()
        decode.close()
