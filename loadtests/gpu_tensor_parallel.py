"""Tensor parallelism on GPUs (NCCL), run on a machine with at least 2 GPUs.

1. fp32, eager: TP=2 (and TP=4 where 4 GPUs are visible) greedy tokens equal TP=1's on tiny random
   checkpoints of every family, logprobs within 1e-3, batched with chunked prefill.
2. bf16 with CUDA graphs (their capture holds the NCCL all-reduces): TP=2's tokens equal TP=2 eager's.
3. Decode throughput of the demo-sized checkpoint at TP=1 and TP=2 (tokens/s, for the record).

    python loadtests/gpu_tensor_parallel.py        (exits non-zero on any mismatch)
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import torch  # noqa: E402

from checkpoints import build_checkpoint  # noqa: E402
from splitserve.shared.llm import LLM  # noqa: E402
from splitserve.shared.sampling_params import SamplingParams  # noqa: E402

FAMILIES = {"llama": dict(num_attention_heads=4, num_key_value_heads=1), "qwen2_moe": {}, "mixtral": {},
            "gemma2": {}, "phi3": dict(hidden_size=192, num_attention_heads=12, num_key_value_heads=4), "olmo2": {}}
PROMPTS = [{"prompt_token_ids": [5 + (7 * i + j) % 4000 for j in range(n)]} for i, n in enumerate((5, 17, 40, 3))]


def run(model_dir: str, tp: int, **options) -> list[tuple[list[int], list[float]]]:
    llm = LLM(model_dir, device="cuda", tensor_parallel_size=tp, num_blocks=256, block_size=16,
              max_num_batched_tokens=16, **options)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=0)
        outs = [r.outputs[0] for r in llm.generate(PROMPTS, params)]
        return [(o.token_ids, [e[t].logprob for e, t in zip(o.logprobs, o.token_ids)]) for o in outs]
    finally:
        llm.close()


def compare(name: str, want, got, atol: float) -> list[str]:
    errors = []
    for i, ((wt, wl), (gt, gl)) in enumerate(zip(want, got)):
        if wt != gt:
            errors.append(f"{name} prompt {i}: tokens differ {wt} vs {gt}")
        elif max(abs(a - b) for a, b in zip(wl, gl)) > atol:
            errors.append(f"{name} prompt {i}: logprobs differ by more than {atol}")
    return errors


def main() -> int:
    torch.backends.cuda.matmul.allow_tf32 = False
    sizes = [n for n in (2, 4) if n <= torch.cuda.device_count()]
    if not sizes:
        print("needs at least 2 GPUs")
        return 2
    errors = []
    for arch, overrides in FAMILIES.items():
        model_dir = build_checkpoint(tempfile.mkdtemp(prefix=f"tp-{arch}-"), arch, **overrides)
        base = run(model_dir, 1, dtype="float32", enforce_eager=True)
        for tp in sizes:
            got = run(model_dir, tp, dtype="float32", enforce_eager=True)
            errors += compare(f"{arch} fp32 TP={tp}", base, got, 1e-3)
        eager = run(model_dir, 2, dtype="bfloat16", enforce_eager=True)
        errors += compare(f"{arch} bf16 TP=2 graphs", eager, run(model_dir, 2, dtype="bfloat16"), float("inf"))  # tokens
        print(arch, "checked", flush=True)
    demo = build_checkpoint(tempfile.mkdtemp(prefix="tp-speed-"), "llama", hidden_size=1024, intermediate_size=4096,
                            num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=8)
    for tp in (1, 2):
        llm = LLM(demo, device="cuda", tensor_parallel_size=tp)
        params = SamplingParams(temperature=0.0, max_tokens=256, ignore_eos=True)
        llm.generate(PROMPTS, params)  # warm
        start = time.perf_counter()
        llm.generate(PROMPTS * 16, params)
        print(f"TP={tp}: {64 * 256 / (time.perf_counter() - start):.0f} decode tokens/s (64 requests)", flush=True)
        llm.close()
    print("\n".join(errors) or "all tensor-parallel GPU checks passed")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
