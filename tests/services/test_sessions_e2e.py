"""Agent sessions end to end (`splitserve up` subprocesses, the `openai` client): a conversation
that comes back turn after turn on a device pool too small to keep it.

Colocated with the host tier: every turn after the first reuses its history (cached_tokens > 0),
and the worker's counters show blocks restored from host memory. Disaggregated: a keyed turn runs
whole on the decode worker that holds its history, so it computes no more than its new tokens
(asserted from cached_tokens, the router's reason metric and the KV bytes counter, not timing).
"""

from __future__ import annotations

import httpx
import pytest

from stack import LocalStack, all_up, metric_total

pytestmark = pytest.mark.slow

BLOCK = 16
POOL = ["--num-blocks", "16", "--block-size", str(BLOCK), "--kv-offload-gib", "0.01"]
SYSTEM = [(i * 7) % 500 + 10 for i in range(48)]  # a shared system prompt
NEW_TOKENS = 12  # each turn's tool result
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def stacks(tmp_path_factory) -> dict[str, LocalStack]:
    """One stack per test below (each counts from a fresh one), started at once so that their
    start-ups overlap."""
    cache_dir = str(tmp_path_factory.mktemp("sessions-cache"))
    with all_up(LocalStack(["--colocated", *POOL], cache_dir),
                LocalStack(["--prefill", "1", "--decode", "1", *POOL], cache_dir)) as (colocated, disaggregated):
        yield {"colocated": colocated, "disaggregated": disaggregated}


def run_sessions(stack: LocalStack, num_sessions: int = 3, num_turns: int = 3) -> dict[str, list]:
    """Sessions take turns (so each evicts the others' blocks); {session: [usage of each turn]}."""
    client = stack.openai()
    history = {f"s{k}": SYSTEM + [(k * 31 + i) % 500 + 600 for i in range(24)] for k in range(num_sessions)}
    usages: dict[str, list] = {key: [] for key in history}
    for turn in range(num_turns):
        for key, prompt in history.items():
            r = client.completions.create(
                model="splitserve-demo", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                extra_body={"ignore_eos": True, "prompt_cache_key": key, "return_token_ids": True})
            assert r.choices[0].prompt_token_ids == prompt
            usages[key].append(r.usage)
            tool = [(turn * 13 + i) % 500 + 1200 for i in range(NEW_TOKENS)]
            history[key] = prompt + r.choices[0].token_ids + tool
    return usages


def counters(stack: LocalStack, role: str) -> dict[str, int]:
    return dict(stack.load(role).counters)


def test_colocated_session_turns_hit_the_host_tier(stacks):
    stack = stacks["colocated"]
    usages = run_sessions(stack)
    for turns in usages.values():
        assert turns[0].prompt_tokens_details.cached_tokens < turns[0].prompt_tokens
        assert all(u.prompt_tokens_details.cached_tokens > 0 for u in turns[1:])
    worker = counters(stack, "worker")
    assert worker["restore_blocks"] > 0 and worker["restores_failed"] == 0
    assert worker["host_blocks_pinned"] == 0
    load = stack.load("worker")
    assert load.num_free_blocks == load.num_total_blocks  # nothing leaked on the device


def test_disaggregated_next_turn_computes_only_its_new_tokens(stacks):
    stack = stacks["disaggregated"]
    metrics = httpx.get(f"{stack.url}/metrics").text
    usages = run_sessions(stack)
    after = httpx.get(f"{stack.url}/metrics").text
    num_sessions, num_turns = len(usages), len(next(iter(usages.values())))
    for turns in usages.values():
        for u in turns[1:]:
            recomputed = u.prompt_tokens - u.prompt_tokens_details.cached_tokens
            # the new tokens: the tool result, the previous turn's last sampled token (no KV yet),
            # and the partly filled block those fall into
            assert 0 < recomputed <= NEW_TOKENS + 1 + BLOCK, u
    routed = metric_total(after, 'splitserve_gateway_routes_total{reason="session-on-decode"}')
    assert routed == num_sessions * (num_turns - 1)
    moved = metric_total(after, "splitserve_gateway_kv_transfer_bytes") - metric_total(
        metrics, "splitserve_gateway_kv_transfer_bytes")
    first_turn_bytes = moved  # only first turns crossed the transfer plane
    assert first_turn_bytes > 0
    decode = counters(stack, "decode")
    assert decode["transfers_ok"] == num_sessions  # one transfer per session: its first turn
    assert decode["restore_blocks"] > 0  # later turns came back from the decode's host tier
    load = stack.load("decode")
    assert load.num_free_blocks == load.num_total_blocks

