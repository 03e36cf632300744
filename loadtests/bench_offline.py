"""Offline throughput: splitserve's engine vs Hugging Face transformers' continuous batching vs the
roofline, in one run, on one GPU, with random weights of a real model shape.

    python loadtests/bench_offline.py --shape llama-3.2-1b --num-prompts 256 --input-len 512 --output-len 128

Prints one table: wall time, output tokens/s, and the ratio to the roofline
(prefill FLOPs / measured bf16 matmul rate + decode bytes / measured copy bandwidth) and to the peer.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from shapes import SHAPES, expected_experts_touched, kv_bytes_per_token, moe_experts, param_count, write_shape  # noqa: E402
from results import add_result_json_arg, write_result_json  # noqa: E402
from workload import add_engine_args, add_shape_arg, add_workload_args, random_prompts  # noqa: E402


def measure_ceilings() -> tuple[float, float]:
    """(copy bandwidth in bytes/s counting read + write, bf16 matmul FLOP/s), measured here."""
    import torch
    import triton.testing

    src = torch.randn(256 * 2**20, device="cuda", dtype=torch.bfloat16)  # 512 MiB
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    bandwidth = 2 * src.numel() * src.element_size() / (ms * 1e-3)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    flops = 2 * 8192**3 / (ms * 1e-3)
    del src, dst, a, b
    torch.cuda.empty_cache()
    return bandwidth, flops


def roofline_s(shape: str, num: int, input_len: int, output_len: int, bandwidth: float, flops: float,
               max_num_seqs: int | None = None) -> tuple[float, float]:
    """Lower bounds. Prefill is matmul-bound: 2·(active params − embedding)·prompt tokens, the LM head
    only for each request's last prompt token, plus causal attention. Each of the output_len − 1
    decode steps must read every weight it uses once plus every live token's KV once; for a
    mixture of experts that is the experts its batch touches (`decode_weight_bytes`)."""
    c = SHAPES[shape]
    _, top_k, _ = moe_experts(shape)
    head_dim = c.get("head_dim", c["hidden_size"] // c["num_attention_heads"])
    embedding = c["vocab_size"] * c["hidden_size"]
    active = param_count(shape, active_experts=top_k) if top_k else param_count(shape)
    body = active - embedding - (0 if c["tie_word_embeddings"] else embedding)
    attn_flops = 4 * c["num_hidden_layers"] * c["num_attention_heads"] * head_dim * num * input_len * input_len / 2
    prefill = (2 * body * num * input_len + 2 * embedding * num + attn_flops) / flops
    kv = kv_bytes_per_token(shape)
    weight_bytes = decode_weight_bytes(shape, min(num, max_num_seqs or num))
    decode = sum(weight_bytes + num * (input_len + step) * kv for step in range(1, output_len)) / bandwidth
    return prefill, decode


def decode_weight_bytes(shape: str, batch: int) -> float:
    """bf16 weight bytes one decode step of `batch` requests reads: every dense weight, and per MoE
    layer the experts that batch touches (all 128 of Qwen3-30B-A3B's at batch 64 under uniform
    routing, so the active-parameter bytes alone, also printed, are no bound there)."""
    if not moe_experts(shape)[0]:
        return 2 * param_count(shape)
    return 2 * param_count(shape, active_experts=expected_experts_touched(shape, batch))


def run_ours(model_dir: str, prompts: list[list[int]], output_len: int, args, async_scheduling: bool) -> float:
    from splitserve.shared.heap import release_startup_heap
    from splitserve.shared.llm import LLM
    from splitserve.shared.sampling_params import SamplingParams

    llm = LLM(model_dir, load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              gpu_memory_utilization=args.gpu_memory_utilization, enable_prefix_caching=False,
              async_scheduling=async_scheduling)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    import torch

    # The first pass over the workload is not timed: it pays one-time costs (Triton compiles of
    # specialisations the start-up warm-up did not reach, allocator growth). It is printed, with its
    # slowest steps, so a cold start stays visible.
    elapsed = []
    steps = _time_steps(llm.engine)
    for attempt in ("cold", "timed"):
        steps.clear()
        torch.cuda.synchronize()
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        torch.cuda.synchronize()
        elapsed.append(time.perf_counter() - start)
        print(f"{attempt} pass: {elapsed[-1]:.3f} s; slowest steps (ms): "
              f"{sorted((round(t * 1e3, 1) for *_, t in steps), reverse=True)[:4]}", flush=True)
        _print_step_breakdown(steps)
        produced = sum(len(o.outputs[0].token_ids) for o in outs)
        assert produced == len(prompts) * output_len, f"produced {produced} tokens"
    del llm, outs
    release_startup_heap()  # the engine froze its start-up objects, its KV pool among them
    gc.collect()  # the engine holds reference cycles: free its KV pool before the next system loads
    torch.cuda.empty_cache()
    return elapsed[-1]


def _time_steps(engine) -> list[tuple[int, int, float]]:
    """Record (requests, new tokens, seconds) of every engine step. A synchronous step waits for its
    own tokens; an async one launches its batch and waits for the previous step's tokens."""
    steps: list[tuple[int, int, float]] = []
    step, schedule = engine.step, engine.scheduler.schedule
    last: list = []

    def timed_schedule():
        out = schedule()
        last[:] = [len(out.scheduled), out.num_batched_tokens]
        return out

    def timed_step():
        t0 = time.perf_counter()
        result = step()
        steps.append((*last, time.perf_counter() - t0))
        return result

    engine.step, engine.scheduler.schedule = timed_step, timed_schedule
    return steps


def _print_step_breakdown(steps) -> None:
    decode = [t for n, tokens, t in steps if tokens == n]
    other = [t for n, tokens, t in steps if tokens != n]
    print(f"steps: {len(other)} prefill/mixed steps {sum(other):.3f} s; {len(decode)} decode steps {sum(decode):.3f} s"
          f" (median {sorted(decode)[len(decode) // 2] * 1e3 if decode else 0:.2f} ms)", flush=True)


def run_transformers(model_dir: str, prompts: list[list[int]], output_len: int, attn: str) -> float:
    """transformers' own continuous batching (`generate_batch`), outside inference_mode as it requires."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(0)
    with torch.device("cuda"):  # random init on the GPU: an 8B model initialised on the host takes minutes
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=attn).eval()
    gen = GenerationConfig(max_new_tokens=output_len, do_sample=False, eos_token_id=-1, pad_token_id=0,
                           use_cuda_graph=False)
    model.generate_batch(inputs=prompts[:4], generation_config=gen)
    torch.cuda.synchronize()
    start = time.perf_counter()
    results = model.generate_batch(inputs=prompts, generation_config=gen)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    produced = sum(len(r.generated_tokens) for r in results.values())
    print(f"transformers produced {produced} tokens", flush=True)
    del model
    torch.cuda.empty_cache()
    return elapsed


def _print_moe_floors(shape: str, batch: int, context: int, bandwidth: float) -> None:
    """A MoE decode step's floors at `batch` requests of `context` tokens: the active parameters
    alone (no bound once the batch touches most experts), the experts it touches, and those plus
    the KV reads (what the roofline sums over the steps; compare a measured step with this one)."""
    num_experts, top_k, _ = moe_experts(shape)
    if not num_experts:
        return
    active = 2 * param_count(shape, active_experts=top_k)
    touched = decode_weight_bytes(shape, batch)
    with_kv = touched + batch * context * kv_bytes_per_token(shape)
    print(f"MoE decode step at batch {batch}: active-parameter bytes {active / 1e9:.2f} GB "
          f"({active / bandwidth * 1e3:.2f} ms), bytes of the {expected_experts_touched(shape, batch):.1f}/{num_experts} "
          f"experts per layer the batch touches {touched / 1e9:.2f} GB ({touched / bandwidth * 1e3:.2f} ms), "
          f"plus the KV of {context} tokens each {with_kv / 1e9:.2f} GB ({with_kv / bandwidth * 1e3:.2f} ms, "
          f"the step floor the roofline uses at mid-decode)", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arg(parser, "llama-3.2-1b")
    add_workload_args(parser, num_prompts=256, input_len=512, output_len=128)
    add_engine_args(parser, max_num_batched_tokens=16384, gpu_memory_utilization=0.85)
    parser.add_argument("--peer", default="paged|sdpa", help="transformers attn_implementation for the peer, or 'none'")
    parser.add_argument("--scheduling", default="async,sync",
                        help="comma list of engine modes to run: async (the CUDA default), sync")
    add_result_json_arg(parser)
    args = parser.parse_args()

    model_dir = write_shape(args.shape, tempfile.mkdtemp(prefix=f"shape-{args.shape}-"))
    prompts = random_prompts(args.num_prompts, args.input_len, SHAPES[args.shape]["vocab_size"])
    bandwidth, flops = measure_ceilings()
    prefill_floor, decode_floor = roofline_s(args.shape, args.num_prompts, args.input_len, args.output_len,
                                             bandwidth, flops, args.max_num_seqs)
    floor = prefill_floor + decode_floor
    print(f"ceilings: copy {bandwidth / 1e12:.2f} TB/s, bf16 matmul {flops / 1e12:.0f} TFLOP/s; roofline "
          f"{floor:.3f} s (prefill {prefill_floor:.3f} + decode {decode_floor:.3f})", flush=True)
    _print_moe_floors(args.shape, min(args.num_prompts, args.max_num_seqs), args.input_len + args.output_len // 2,
                      bandwidth)
    rows = [("roofline", floor)]
    for mode in args.scheduling.split(","):
        if mode not in ("async", "sync"):
            parser.error(f"--scheduling takes async and/or sync, got {mode!r}")
        ours = run_ours(model_dir, prompts, args.output_len, args, async_scheduling=mode == "async")
        rows.append((f"splitserve ({mode} scheduling)", ours))
        print(f"splitserve ({mode} scheduling): {ours:.2f} s", flush=True)
    if args.peer != "none":
        try:
            rows.append((f"transformers generate_batch ({args.peer})", run_transformers(model_dir, prompts, args.output_len, args.peer)))
        except Exception as exc:  # report, don't hide: the table says the peer failed
            print(f"peer failed: {type(exc).__name__}: {exc}", flush=True)
    out_tokens = args.num_prompts * args.output_len
    print(f"\n{args.shape}, {args.num_prompts} requests x ({args.input_len} in -> {args.output_len} out), bf16, ignore_eos")
    print(f"{'system':42s} {'time_s':>8s} {'out tok/s':>10s} {'x roofline':>10s} {'speedup vs peer':>16s}")
    peer_time = next((t for name, t in rows if name.startswith("transformers")), None)
    for name, t in rows:
        speedup = f"{peer_time / t:.1f}x" if peer_time else "-"
        print(f"{name:42s} {t:8.3f} {out_tokens / t:10.0f} {t / floor:10.2f} {speedup:>16s}")
    write_result_json(args.result_json, {"args": vars(args), "bandwidth_Bps": bandwidth, "matmul_flops": flops,
                                         "rows": [{"system": n, "time_s": t} for n, t in rows]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
