"""The prefill's handle carries its prompt blocks' chained hashes, and the decode engine registers
the loaded blocks under them instead of hashing the prompt again (a cost on the hand-off's path).
One real engine in both roles (ucxx keeps one context per process), its real transfer connector
(UCX over TCP) loading from itself: the prefill request holds, the decode request loads its handle."""

from __future__ import annotations

import dataclasses
import time

import pytest

from splitserve.shared.config import CacheConfig, EngineConfig, ModelConfig
from splitserve.shared.engine import EngineCore
from splitserve.shared.kv import hash_prompt_blocks, kv_cache_manager
from splitserve.shared.request import KvTransferParams
from splitserve.shared.runner import SampledToken
from splitserve.shared.sampling_params import SamplingParams

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

BS = 4
PROMPT = list(range(10, 32))  # five full blocks and a partial one


def _engine(checkpoint: str, role: str = "both") -> EngineCore:
    from splitserve.shared.transfer.connector import TransferConfig, TransferConnector

    def connector(parts):
        return TransferConnector(parts.kv_cache, TransferConfig(role=role, ucx_tls="tcp", model_id="hashes",
                                                                timeout_s=30, lease_s=60))
    return EngineCore(EngineConfig(model=ModelConfig(model=checkpoint, device="cpu"),
                                   cache=CacheConfig(num_blocks=64, block_size=BS)), connector)


def _step_until(core: EngineCore, done, timeout_s: float = 120) -> list:
    outputs, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        outputs += core.step()
        if done(outputs):
            return outputs
        time.sleep(0.001)
    raise AssertionError(f"not done within {timeout_s} s: {outputs}")


@pytest.fixture(scope="module")
def engines(checkpoint_factory):
    core = _engine(checkpoint_factory("llama"))
    yield core, core
    core.close()


def _prefill(prefill: EngineCore, request_id: str):
    greedy = SamplingParams(max_tokens=4, temperature=0)
    prefill.add_request(request_id, PROMPT, greedy, kv_transfer=KvTransferParams(hold=True))
    out = _step_until(prefill, lambda outs: any(o.kv_handle is not None for o in outs))
    return next(o for o in out if o.kv_handle is not None)


def _decode(decode: EngineCore, request_id: str, first, handle, monkeypatch) -> tuple[list[int], int]:
    calls, real = [], kv_cache_manager.hash_block_tokens
    monkeypatch.setattr(kv_cache_manager, "hash_block_tokens", lambda *a: calls.append(a) or real(*a))
    decode.add_request(request_id, PROMPT, SamplingParams(max_tokens=4, temperature=0),
                       kv_transfer=KvTransferParams(handle=handle),
                       first_token=SampledToken(first.new_token_ids[0], 0.0, 1, ()))
    hashes = []
    for _ in range(200):  # until the load landed and its blocks were registered
        decode.step()
        hashes = decode.kv.block_hashes(request_id)
        if hashes:
            break
        time.sleep(0.01)
    num_loaded_calls = len(calls)
    monkeypatch.undo()
    _step_until(decode, lambda outs: any(o.finished and o.request_id == request_id for o in outs))
    return hashes, num_loaded_calls


def test_the_handle_carries_the_hashes_and_the_decode_engine_adopts_them(engines, monkeypatch):
    prefill, decode = engines
    first = _prefill(prefill, "adopt-p")
    expected = hash_prompt_blocks(PROMPT, BS)
    assert list(first.kv_handle.block_hashes) == expected
    hashes, num_hashed = _decode(decode, "adopt-d", first, first.kv_handle, monkeypatch)
    assert hashes[:len(expected)] == expected
    assert num_hashed == 2  # the first and last blocks' check, not the prompt's five


def test_a_handle_without_hashes_from_an_older_peer_is_hashed_on_the_decode_side(engines, monkeypatch):
    prefill, decode = engines
    first = _prefill(prefill, "old-peer-p")
    old_handle = dataclasses.replace(first.kv_handle, block_hashes=())
    hashes, num_hashed = _decode(decode, "old-peer-d", first, old_handle, monkeypatch)
    assert hashes[:5] == hash_prompt_blocks(PROMPT, BS)
    assert num_hashed >= 5
