"""Gemma 2 (interleaved sliding / global layers, tiny, random) through a colocated `splitserve up`:
the worker splits its KV pool by layer group (reported in its load counters), and greedy output
through the gateway equals the offline engine's for prompts longer than the window."""

from __future__ import annotations

import pytest

from stack import LocalStack, greedy_completions

pytestmark = pytest.mark.slow

MAX_TOKENS = 12


def test_colocated_gemma2_splits_its_pool_and_equals_offline(checkpoint_factory, tmp_path):
    from splitserve.shared.llm import LLM
    from splitserve.shared.sampling_params import SamplingParams

    model_dir = checkpoint_factory("gemma2")  # window 6
    prompts = ["The quick brown fox jumps over the lazy dog " * 3, "def fibonacci(n):\n    if n < 2:"]
    stack = LocalStack(["--model", model_dir, "--colocated", "--num-blocks", "64", "--block-size", "4", "--max-num-seqs",
                        "4", "--max-num-batched-tokens", "64"], str(tmp_path))
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    offline = [o.outputs[0].text for o in LLM(model_dir, device="cpu", num_blocks=256).generate(prompts, params)]
    with stack:
        served = greedy_completions(stack.openai(), prompts, MAX_TOKENS)
        load = stack.load("worker")
    assert all(prompt_tokens > 6 for _, prompt_tokens in served)
    assert [text for text, _ in served] == offline
    counters = dict(load.counters)
    assert counters["kv_blocks_window_6"] < counters["kv_blocks_full"] == load.num_total_blocks, counters
