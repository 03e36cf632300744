"""P/D across tensor-parallel sizes on GPUs: `splitserve up --prefill-tp P --decode-tp D` (UCX,
NCCL tensor-parallel groups), run on a machine with at least 2 GPUs (3+ keeps the workers apart).

For prefill TP=2 -> decode TP=1 and prefill TP=1 -> decode TP=2, on tiny fp32 checkpoints with 2
kv heads and with 1 (replicated over the TP=2 side's ranks): the stack's greedy tokens equal the
TP=1 engine's, the decode worker received every prompt's whole-head blocks (its counters), and
nothing was recomputed (the gateway's metrics). Prints one line per case and the KV GB/s.

    python loadtests/gpu_pd_tensor_parallel.py        (exits non-zero on any mismatch)

The CPU version of the same checks is tests/services/test_stack_pd_tensor_parallel.py.
"""

from __future__ import annotations

import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "tests"), os.path.join(HERE, "..", "tests", "services")]

import httpx  # noqa: E402
import torch  # noqa: E402

from checkpoints import build_checkpoint  # noqa: E402
from stack import LocalStack, metric_total  # noqa: E402
from splitserve.shared.llm import LLM  # noqa: E402
from splitserve.shared.sampling_params import SamplingParams  # noqa: E402

PROMPTS = ["def fibonacci(n):", "The quick brown fox " * 30, "x = [i * i for i in range(10)]\n" * 12]
MAX_TOKENS = 24
BLOCK_SIZE = 16
CASES = [(2, 1), (1, 2)]


def offline(model_dir: str) -> list[str]:
    llm = LLM(model_dir, device="cuda", dtype="float32", enforce_eager=True, num_blocks=256, block_size=BLOCK_SIZE)
    try:
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))
        return [o.outputs[0].text for o in outs]
    finally:
        llm.close()


def served(model_dir: str, prefill_tp: int, decode_tp: int, cache: str) -> tuple[list[str], dict, str]:
    args = ["--prefill", "1", "--decode", "1", "--prefill-tp", str(prefill_tp), "--decode-tp", str(decode_tp),
            "--model", model_dir, "--served-model-name", "tiny", "--dtype", "float32", "--enforce-eager",
            "--num-blocks", "256", "--block-size", str(BLOCK_SIZE), "--gpu-memory-utilization", "0.3",
            "--transfer-ucx-tls", "tcp,cuda_copy,cuda_ipc"]
    with LocalStack(args, cache, device="cuda") as stack:
        client = stack.openai()
        texts = []
        for prompt in PROMPTS:
            r = client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                          extra_body={"ignore_eos": True})
            texts.append(r.choices[0].text)
        return texts, dict(stack.load("decode").counters), httpx.get(f"{stack.url}/metrics").text


def check(name: str, model_dir: str, prefill_tp: int, decode_tp: int, cache: str) -> list[str]:
    want = offline(model_dir)
    got, counters, metrics = served(model_dir, prefill_tp, decode_tp, cache)
    errors = [f"{name}: prompt {i} differs: {w!r} vs {g!r}" for i, (w, g) in enumerate(zip(want, got)) if w != g]
    if counters.get("transfers_ok") != len(PROMPTS) or counters.get("transfers_failed", 0):
        errors.append(f"{name}: transfers {counters}")
    recomputed = metric_total(metrics, "splitserve_gateway_recomputed_tokens_total")
    if recomputed:
        errors.append(f"{name}: {recomputed} tokens recomputed on decode")
    print(f"{name}: prefill TP={prefill_tp} -> decode TP={decode_tp}: {'tokens equal' if not errors else 'FAILED'}, "
          f"{counters.get('bytes_received', 0)} bytes in {counters.get('blocks_received', 0)} blocks, "
          f"last {counters.get('last_gbps', 0):.2f} GB/s", flush=True)
    return errors


def main() -> int:
    torch.backends.cuda.matmul.allow_tf32 = False
    if torch.cuda.device_count() < 2:
        print("needs at least 2 GPUs")
        return 2
    errors = []
    cache = tempfile.mkdtemp(prefix="pd-tp-cache-")
    for kv_heads in (2, 1):
        model_dir = build_checkpoint(tempfile.mkdtemp(prefix=f"pd-tp-kv{kv_heads}-"), "llama",
                                     num_attention_heads=4, num_key_value_heads=kv_heads)
        for prefill_tp, decode_tp in CASES:
            errors += check(f"kv_heads={kv_heads}", model_dir, prefill_tp, decode_tp, cache)
    print("\n".join(errors) or "all P/D tensor-parallel GPU checks passed")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
