"""P/D across tensor-parallel sizes, end to end through the `openai` client against `splitserve up`:
prefill at TP=2 feeding decode at TP=1, and the reverse (CPU, gloo, every rank a real process).

KV crosses the wire with whole heads: a TP=2 prefill gathers its ranks' head shards into the blocks
it sends, a TP=2 decode scatters the received blocks to its ranks. Greedy output must be the
colocated TP=1 engine's, the decode side must receive exactly the prompts' whole-head blocks, and
nothing may be recomputed. The reverse stack serves a checkpoint with one kv head, so its two decode
ranks both hold (a replica of) that head.
"""

from __future__ import annotations

import contextlib

import httpx
import pytest

from stack import LocalStack, all_up, greedy_completions, metric_total, offline_greedy_texts

pytestmark = pytest.mark.slow

PROMPTS = ["def fibonacci(n):", "The quick brown fox " * 6, "x = [i * i for i in range(10)]"]
MAX_TOKENS = 12
BLOCK_SIZE = 16


@pytest.fixture(scope="module")
def one_kv_head(checkpoint_factory) -> str:
    return checkpoint_factory("llama", num_key_value_heads=1)


@pytest.fixture(scope="module")
def stacks(tmp_path_factory, one_kv_head, demo_checkpoint_dir):
    """(prefill TP=2 -> decode TP=1 on the demo checkpoint, prefill TP=1 -> decode TP=2 with one kv
    head) and the colocated TP=1 engine's greedy texts of each checkpoint. The stacks start at
    once so that their start-ups overlap, and the offline references are computed meanwhile."""
    cache = str(tmp_path_factory.mktemp("pd-tp-cache"))
    common = ["--prefill", "1", "--decode", "1", "--num-blocks", "128", "--block-size", str(BLOCK_SIZE)]
    starting = (LocalStack([*common, "--prefill-tp", "2"], cache),
                LocalStack([*common, "--decode-tp", "2", "--model", one_kv_head, "--served-model-name", "tiny"], cache))
    with contextlib.ExitStack() as cleanup:
        for stack in starting:
            cleanup.push(stack.__exit__)  # stopped even if an offline run fails
        references = [_offline(demo_checkpoint_dir), _offline(one_kv_head)]
        with all_up(*starting) as both:
            yield list(zip(both, references))


def _offline(model_dir: str) -> list[str]:
    return offline_greedy_texts(model_dir, PROMPTS, MAX_TOKENS, num_blocks=128, block_size=BLOCK_SIZE)


def _whole_head_block_bytes(model_dir: str) -> int:
    from splitserve.shared.model.loader import load_hf_config, model_info

    info = model_info(load_hf_config(model_dir), model_dir)
    return info.num_layers * 2 * BLOCK_SIZE * info.num_kv_heads * info.head_dim * 4  # fp32 on CPU


def _check_stack(stack: LocalStack, model: str, model_dir: str, offline: list[str]) -> None:
    metrics = httpx.get(f"{stack.url}/metrics").text
    moved_before = metric_total(metrics, "splitserve_gateway_kv_transfer_bytes_total")
    recomputed_before = metric_total(metrics, "splitserve_gateway_recomputed_tokens_total")
    before = stack.load("decode").counters
    served = greedy_completions(stack.openai(), PROMPTS, MAX_TOKENS, model)
    assert [text for text, _ in served] == offline
    after = stack.load("decode").counters
    assert after["transfers_ok"] - before.get("transfers_ok", 0) == len(PROMPTS)
    assert after.get("transfers_failed", 0) == before.get("transfers_failed", 0)
    blocks = sum(-(-prompt_tokens // BLOCK_SIZE) for _, prompt_tokens in served)
    received = after["bytes_received"] - before.get("bytes_received", 0)
    assert received == blocks * _whole_head_block_bytes(model_dir)  # whole heads, every prompt block
    metrics = httpx.get(f"{stack.url}/metrics").text
    assert metric_total(metrics, "splitserve_gateway_kv_transfer_bytes_total") - moved_before == received
    assert metric_total(metrics, "splitserve_gateway_recomputed_tokens_total") == recomputed_before


def test_prefill_tp2_to_decode_tp1_serves_the_colocated_tokens_with_kv_moved(stacks, demo_checkpoint_dir):
    prefill_tp2, offline = stacks[0]
    _check_stack(prefill_tp2, "splitserve-demo", demo_checkpoint_dir, offline)


def test_prefill_tp1_to_decode_tp2_with_a_replicated_kv_head(stacks, one_kv_head):
    decode_tp2, offline = stacks[1]
    _check_stack(decode_tp2, "tiny", one_kv_head, offline)
