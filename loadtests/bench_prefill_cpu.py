"""Long-prompt prefill on CPU: the attention path of `paged_attention_cpu` A/B, alternating in one run.

    python loadtests/bench_prefill_cpu.py --shape qwen2.5-0.5b --prompt-len 2048 --rounds 2

One engine (random weights of `--shape`, fp32 on CPU) prefills one prompt of `--prompt-len` tokens
and samples one token, timed end to end, once per path per round:

    reference  each prefill chunk through `paged_attention_ref` (the full [Hq, q_len, seq_len]
               score matrix, the path before torch SDPA was used)
    sdpa       the CPU path as shipped: K/V gathered once, torch's fused scaled_dot_product_attention

The two paths alternate so that a shared, loaded machine slows both alike. The first token of
each path must agree (greedy, same weights).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from shapes import SHAPES, write_shape  # noqa: E402
from workload import add_shape_arg  # noqa: E402


def reference_chunk_attention(q, k_cache, v_cache, block_ids, seq_len, scale, sliding_window):
    """`_chunk_attention` through the plain-torch oracle: the old CPU prefill path."""
    import torch

    from splitserve.kernels.paged_attention import paged_attention_ref

    return paged_attention_ref(q, k_cache, v_cache, torch.tensor([0, q.shape[0]], dtype=torch.int32),
                               torch.tensor([seq_len], dtype=torch.int32), block_ids[None], scale, sliding_window)


def prefill_s(llm, prompt: list[int]) -> tuple[float, int]:
    from splitserve.shared.sampling_params import SamplingParams

    start = time.perf_counter()
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0.0, max_tokens=1))
    return time.perf_counter() - start, out[0].outputs[0].token_ids[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arg(p, "qwen2.5-0.5b")
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from splitserve.kernels import paged_attention_cpu as attention
    from splitserve.shared.llm import LLM

    model_dir = write_shape(args.shape, tempfile.mkdtemp(prefix=f"prefill-{args.shape}-"))
    llm = LLM(model_dir, load_format="dummy", dtype="float32", device="cpu", skip_tokenizer_init=True,
              max_num_batched_tokens=args.prompt_len, max_model_len=args.prompt_len + 16, enable_prefix_caching=False)
    rng = random.Random(args.seed)
    prompt = [rng.randrange(SHAPES[args.shape]["vocab_size"]) for _ in range(args.prompt_len)]
    paths = {"reference": reference_chunk_attention, "sdpa": attention._chunk_attention}
    times: dict[str, list[float]] = {name: [] for name in paths}
    firsts = set()
    for rnd in range(args.rounds):
        for name, chunk_attention in paths.items():
            attention._chunk_attention = chunk_attention
            seconds, first = prefill_s(llm, prompt)
            times[name].append(seconds)
            firsts.add(first)
            print(f"round {rnd}: {name:9s} {seconds:7.2f} s", flush=True)
    attention._chunk_attention = paths["sdpa"]
    print(f"\n{args.shape}, one {args.prompt_len}-token prompt, fp32, {os.cpu_count()} CPUs; best of {args.rounds}:")
    for name, values in times.items():
        print(f"  {name:9s} {min(values):7.2f} s  (all: {', '.join(f'{v:.2f}' for v in values)})")
    print(f"  speed-up {min(times['reference']) / min(times['sdpa']):.2f}x")
    if len(firsts) != 1:
        print(f"the paths sampled different first tokens: {firsts}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
