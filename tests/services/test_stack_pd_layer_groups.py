"""Interleaved sliding-window models (one full-attention layer, one sliding layer) disaggregated
through `splitserve up`: both workers split their KV pool by layer group, the decode side receives
each group's blocks into its own pools, and a sliding group moves only the blocks its window still
sees at the prompt's end. Greedy output must be the colocated engine's (which the parity tests hold
to transformers), the bytes moved exactly the per-group figure and fewer than one pool's, nothing
recomputed, and every group's pool back to full on both workers once the requests ended.

A colocated Gemma 2 stack, started with the two, splits its one worker's pool the same way (its
load counters) and serves the same greedy tokens for prompts longer than the window."""

from __future__ import annotations

import contextlib

import pytest

from stack import LocalStack, all_up, greedy_completions, offline_greedy_texts, wait_until

pytestmark = pytest.mark.slow

BLOCK_SIZE = 4
MAX_TOKENS = 12
PROMPTS = ["The quick brown fox jumps over the lazy dog " * 3, "def fibonacci(n):\n    if n < 2:",
           "The quick brown fox jumps over the lazy dog " * 3]
"""The third repeats the first: a prefix hit on the prefill side (its sliding group serves the hit
from the window's blocks only), whose blocks it hands out like computed ones."""
ARCHS = {"gemma2": (6, 32), "qwen2_window": (5, 16)}
"""arch -> (window, head_dim) of its tiny checkpoint (tests/checkpoints.py): two layers, one full and
one sliding, two kv heads, fp32 on CPU."""
LAYER_BLOCK_BYTES = {arch: 2 * BLOCK_SIZE * 2 * head_dim * 4 for arch, (_, head_dim) in ARCHS.items()}


POOL = ["--num-blocks", "64", "--block-size", str(BLOCK_SIZE), "--max-num-seqs", "4", "--max-num-batched-tokens", "64"]


@pytest.fixture(scope="module")
def stacks(checkpoint_factory, tmp_path_factory):
    """arch -> (its P/D stack, the colocated engine's greedy texts), and "colocated" -> (a colocated
    Gemma 2 stack, Gemma 2's texts). All three start at once so their start-ups overlap; the
    offline references run meanwhile."""
    cache = str(tmp_path_factory.mktemp("pd-groups-cache"))
    dirs = {arch: checkpoint_factory(arch) for arch in ARCHS}
    starting = [LocalStack(["--model", dirs[arch], "--prefill", "1", "--decode", "1", *POOL], cache) for arch in ARCHS]
    starting.append(LocalStack(["--model", dirs["gemma2"], "--colocated", *POOL], cache))
    with contextlib.ExitStack() as cleanup:
        for stack in starting:
            cleanup.push(stack.__exit__)  # stopped even if an offline run fails
        references = [_offline(dirs[arch]) for arch in ARCHS]
        with all_up(*starting):
            served = {arch: (stack, texts) for arch, stack, texts in zip(ARCHS, starting, references)}
            yield dict(served, colocated=(starting[-1], references[0]))


def _offline(model_dir: str) -> list[str]:
    return offline_greedy_texts(model_dir, PROMPTS, MAX_TOKENS, num_blocks=256, block_size=BLOCK_SIZE)


def _moved_bytes(arch: str, prompt_tokens: int) -> tuple[int, int]:
    """(bytes a split pool moves for a prompt, bytes one pool of both layers would move)."""
    window = ARCHS[arch][0]
    blocks = -(-prompt_tokens // BLOCK_SIZE)
    window_blocks = blocks - max(0, (prompt_tokens - window + 1) // BLOCK_SIZE)
    return (blocks + window_blocks) * LAYER_BLOCK_BYTES[arch], blocks * 2 * LAYER_BLOCK_BYTES[arch]


def _pools_full(stack: LocalStack, role: str, window: int) -> bool:
    c = dict(stack.load(role).counters)
    return (c["kv_free_blocks_full"] == c["kv_blocks_full"]
            and c[f"kv_free_blocks_window_{window}"] == c[f"kv_blocks_window_{window}"] - 1)  # its null block


@pytest.mark.parametrize("arch", list(ARCHS))
def test_split_pools_transfer_per_group_and_serve_the_colocated_tokens(stacks, arch):
    stack, offline = stacks[arch]
    window = ARCHS[arch][0]
    for role in ("prefill", "decode"):  # both workers split their pool
        counters = dict(stack.load(role).counters)
        assert counters[f"kv_blocks_window_{window}"] < counters["kv_blocks_full"], (role, counters)
    before = dict(stack.load("decode").counters)
    client = stack.openai()
    served, prompt_tokens = [], []
    for prompt in PROMPTS:
        r = client.completions.create(model=client.models.list().data[0].id, prompt=prompt, max_tokens=MAX_TOKENS,
                                      temperature=0, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == MAX_TOKENS
        served.append(r.choices[0].text)
        prompt_tokens.append(r.usage.prompt_tokens)
    assert served == offline
    assert stack.load("prefill").prefix_hit_rate > 0
    assert max(prompt_tokens) > window + 2 * BLOCK_SIZE  # a sliding group leaves blocks behind
    after = dict(stack.load("decode").counters)
    assert after["transfers_ok"] - before.get("transfers_ok", 0) == len(PROMPTS)
    assert after.get("transfers_failed", 0) == before.get("transfers_failed", 0)  # nothing recomputed
    split, one_pool = (sum(sizes) for sizes in zip(*(_moved_bytes(arch, n) for n in prompt_tokens)))
    received = after["bytes_received"] - before.get("bytes_received", 0)
    assert received == split < one_pool
    for role in ("prefill", "decode"):
        wait_until(lambda: _pools_full(stack, role, window), timeout_s=30, message=f"{role}'s pools back to full")


def test_colocated_gemma2_splits_its_pool_and_equals_offline(stacks):
    stack, offline = stacks["colocated"]
    served = greedy_completions(stack.openai(), PROMPTS, MAX_TOKENS)
    assert all(prompt_tokens > ARCHS["gemma2"][0] for _, prompt_tokens in served)
    assert [text for text, _ in served] == offline
    load = stack.load("worker")
    counters = dict(load.counters)
    assert counters["kv_blocks_window_6"] < counters["kv_blocks_full"] == load.num_total_blocks, counters
