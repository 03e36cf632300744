"""Decode step time and prefill throughput of the engine against the hardware floors, one GPU.

    python loadtests/bench_step.py --shape llama-3.1-8b --batches 1,32,128,256 --context 1024

Decode: B requests each holding `context` tokens of KV; a step must read every weight once and
every live token's KV once, so floor = (weight bytes + B·context·KV bytes/token) / copy bandwidth.
Reported per batch: the whole engine step (host work included) and the model forward alone.
Prefill: one step of `--prefill-tokens` prompt tokens against 2·(params − embedding)·tokens
(+ attention) / measured bf16 matmul rate.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from bench_offline import measure_ceilings  # noqa: E402
from shapes import SHAPES, kv_bytes_per_token, param_count, write_shape  # noqa: E402
from workload import add_shape_arg  # noqa: E402


def median_ms(samples: list[float]) -> float:
    return sorted(samples)[len(samples) // 2] * 1e3


def wall_ms_per_step(engine, steps: int, warmup: int = 3) -> float:
    """Wall time per engine step over `steps` steps after `warmup`, the GPU drained at both ends (so
    with async scheduling the overlap of host work and GPU counts)."""
    for _ in range(warmup):
        engine.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e3


def decode_times(engine, steps: int) -> tuple[float, float]:
    """(engine step ms, median model forward ms) over `steps` decode steps. The step time is wall
    time over all steps, so with async scheduling it counts the overlap of host work and GPU; the
    forward is timed on further steps, synchronised around it."""
    runner = engine.runner
    forward = runner._forward
    forward_s = []

    def timed_forward(inputs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = forward(inputs)
        torch.cuda.synchronize()
        forward_s.append(time.perf_counter() - t0)
        return out

    step_ms = wall_ms_per_step(engine, steps)
    runner._forward = timed_forward
    try:
        for _ in range(steps):
            engine.step()
    finally:
        runner._forward = forward
    return step_ms, median_ms(forward_s)


def main() -> int:
    parser = argparse.ArgumentParser()
    add_shape_arg(parser, "llama-3.1-8b")
    parser.add_argument("--batches", default="1,32,128,256")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--prefill-tokens", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=False)
    args = parser.parse_args()
    from splitserve.shared.llm import LLM
    from splitserve.shared.sampling_params import SamplingParams

    bandwidth, flops = measure_ceilings()
    batches = [int(b) for b in args.batches.split(",")]
    model_dir = write_shape(args.shape, tempfile.mkdtemp())
    llm = LLM(model_dir, load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True, max_num_seqs=max(batches),
              max_num_batched_tokens=args.prefill_tokens, enable_prefix_caching=False, gpu_memory_utilization=0.9,
              max_model_len=8192, async_scheduling=args.async_scheduling)
    engine = llm.engine
    rng = random.Random(0)
    vocab = SHAPES[args.shape]["vocab_size"]
    params = SamplingParams(temperature=0.0, max_tokens=4096, ignore_eos=True)
    weight_bytes = 2 * param_count(args.shape)
    kv_token = kv_bytes_per_token(args.shape)
    print(f"{args.shape}: {param_count(args.shape) / 1e9:.2f} B params, copy {bandwidth / 1e12:.2f} TB/s, "
          f"bf16 matmul {flops / 1e12:.0f} TFLOP/s", flush=True)
    rows = []
    for batch in batches:
        for r in list(engine.requests):
            engine.abort_request(r)
        for i in range(batch):
            engine.add_request(f"b{batch}-{i}", [rng.randrange(1000, vocab) for _ in range(args.context)], params)
        while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.requests.values()):
            engine.step()
        step_ms, forward_ms = decode_times(engine, args.steps)
        ctx = args.context + 3 + args.steps
        floor_ms = (weight_bytes + batch * ctx * kv_token) / bandwidth * 1e3
        rows.append((batch, step_ms, forward_ms, floor_ms))
        print(f"batch {batch}: step {step_ms:.2f} ms, forward {forward_ms:.2f} ms, floor {floor_ms:.2f} ms", flush=True)
    for r in list(engine.requests):
        engine.abort_request(r)

    # Prefill: fresh prompts filling one step's token budget.
    num_prompts = max(1, args.prefill_tokens // 2048)
    prompt_len = args.prefill_tokens // num_prompts
    c = SHAPES[args.shape]
    head_dim = c.get("head_dim", c["hidden_size"] // c["num_attention_heads"])
    embedding = c["vocab_size"] * c["hidden_size"]
    body = param_count(args.shape) - embedding - (0 if c["tie_word_embeddings"] else embedding)
    times = []
    for rep in range(4):
        for i in range(num_prompts):
            engine.add_request(f"p{rep}-{i}", [rng.randrange(1000, vocab) for _ in range(prompt_len)],
                               SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        while engine.has_unfinished_requests():
            engine.step()
    prefill_s = sorted(times[1:])[len(times[1:]) // 2]
    tokens = num_prompts * prompt_len
    attn_flops = 4 * c["num_hidden_layers"] * c["num_attention_heads"] * head_dim * num_prompts * prompt_len ** 2 / 2
    floor_s = (2 * body * tokens + 2 * embedding * num_prompts + attn_flops) / flops

    mode = "async scheduling" if args.async_scheduling else "sync scheduling"
    print(f"\n{args.shape} decode, context {args.context}, bf16, {mode}, ceilings measured in this run")
    print(f"{'batch':>6s} {'step ms':>8s} {'fwd ms':>8s} {'floor ms':>9s} {'BW% step':>9s} {'BW% fwd':>8s} {'tok/s':>8s}")
    for batch, step_ms, forward_ms, floor_ms in rows:
        print(f"{batch:6d} {step_ms:8.2f} {forward_ms:8.2f} {floor_ms:9.2f} {100 * floor_ms / step_ms:8.0f}% "
              f"{100 * floor_ms / forward_ms:7.0f}% {batch / step_ms * 1e3:8.0f}")
    print(f"prefill: {num_prompts} x {prompt_len} tokens in {prefill_s * 1e3:.1f} ms = {tokens / prefill_s:,.0f} tok/s; "
          f"matmul floor {floor_s * 1e3:.1f} ms ({100 * floor_s / prefill_s:.0f}% of peak)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
