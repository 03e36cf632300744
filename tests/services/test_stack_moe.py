"""A mixture-of-experts checkpoint (Qwen3-MoE, tiny, random) through the disaggregated stack:
greedy output through gateway -> prefill -> KV over UCX -> decode equals the offline engine's, and
the KV really moved."""

from __future__ import annotations

import pytest

from stack import LocalStack, greedy_completions

pytestmark = pytest.mark.slow

PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n\nclass Config:", "The quick brown fox " * 6]
MAX_TOKENS = 12


def test_qwen3_moe_disaggregated_equals_offline(checkpoint_factory, tmp_path):
    from splitserve.shared.llm import LLM
    from splitserve.shared.sampling_params import SamplingParams

    model_dir = checkpoint_factory("qwen3_moe")
    stack = LocalStack(["--model", model_dir, "--prefill", "1", "--decode", "1"], str(tmp_path))  # starting now,
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)                 # beside the offline run
    offline = [o.outputs[0].text for o in LLM(model_dir, device="cpu", num_blocks=256).generate(PROMPTS, params)]
    with stack:
        served = greedy_completions(stack.openai(), PROMPTS, MAX_TOKENS)
        counters = stack.load("decode").counters
    assert [text for text, _ in served] == offline
    assert counters["transfers_ok"] == len(PROMPTS) and counters["bytes_received"] > 0
    assert counters.get("transfers_failed", 0) == 0
