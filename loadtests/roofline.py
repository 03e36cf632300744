"""The agent benchmark's model set-up and rooflines: what a turn would cost at the hardware's limits.

Two kinds of later turn, two bounds, measured on this machine in the same run (CUDA only):
- a turn whose history is retained on the device computes only its new tokens: prefill FLOPs of
  (tool result + previous output) tokens over the measured bf16 matmul peak;
- a turn restored from the host tier also moves its history's KV: restore bytes over the measured
  pinned host->device copy bandwidth, compared with what the worker's copier achieved.
"""

from __future__ import annotations

import argparse
import tempfile

from shapes import SHAPES, kv_bytes_per_token, param_count, write_shape


def model_argv_and_vocab(args: argparse.Namespace) -> tuple[list[str], int]:
    """The `splitserve up` model flags and the vocabulary the prompts may draw from."""
    if args.model == "demo":
        return [], 500
    if args.model:
        return ["--model", args.model], 1000
    from serve_compare import vocab_tokenizer

    model_dir = write_shape(args.shape, tempfile.mkdtemp(prefix=f"agent-{args.shape}-"))
    vocab_tokenizer(SHAPES[args.shape]["vocab_size"]).save_pretrained(model_dir)
    return ["--model", model_dir, "--load-format", "dummy"], SHAPES[args.shape]["vocab_size"]


def measure_h2d_and_matmul() -> tuple[float, float] | None:
    """(pinned host->device bytes/s, bf16 matmul FLOP/s), or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    import triton.testing

    host = torch.empty(256 * 2**20, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty_like(host, device="cuda")
    ms = triton.testing.do_bench(lambda: dev.copy_(host, non_blocking=True), warmup=10, rep=100, return_mode="median")
    bandwidth = host.numel() / (ms * 1e-3)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ a, warmup=20, rep=100, return_mode="median")
    return bandwidth, 2 * 8192**3 / (ms * 1e-3)


def print_roofline(args: argparse.Namespace, summaries: list[dict]) -> dict | None:
    """Prints the bounds; returns them (for the JSON), or None where they cannot be measured."""
    ceilings = measure_h2d_and_matmul()
    if ceilings is None or args.model:
        print("roofline: needs CUDA and a --shape model (skipped)")
        return None
    bandwidth, flops = ceilings
    new_tokens = args.tool_len + args.output_len
    retained_s = prefill_s(args.shape, new_tokens, flops)
    mid_turn = args.turns // 2
    history = args.system_len + args.first_len + mid_turn * (args.output_len + args.tool_len)
    restore_s = history * kv_bytes_per_token(args.shape) / bandwidth
    print(f"roofline (measured: host->device {bandwidth / 1e9:.1f} GB/s pinned, matmul {flops / 1e12:.0f} TFLOP/s)")
    print(f"  retained turn: prefill of {new_tokens} new tokens >= {retained_s * 1e3:.2f} ms")
    print(f"  restored turn {mid_turn}: {history} tokens of KV over host->device >= {restore_s * 1e3:.2f} ms "
          f"(+ the retained-turn bound)")
    for s in summaries:
        if s["restore_gbps"]:
            print(f"  {s['mode']}: restores ran at {s['restore_gbps']:.1f} GB/s = "
                  f"{s['restore_gbps'] * 1e9 / bandwidth:.0%} of the measured copy bandwidth")
    bounds = {"h2d_gbps": bandwidth / 1e9, "matmul_tflops": flops / 1e12, "retained_turn_ms": retained_s * 1e3,
              "restored_turn": mid_turn, "restored_turn_kv_ms": restore_s * 1e3}
    for s in summaries:
        if s["probe"]:
            bounds["probe_prefill_ms"] = print_probe_roofline(s["probe"], args.shape, flops)
    return bounds


def prefill_s(shape: str, num_tokens: float, flops: float) -> float:
    """A prefill of `num_tokens` at the matmul peak: 2 x parameters FLOPs a token (attention over
    the history left out: at a few thousand tokens of context it adds a few percent on this shape)."""
    return 2 * param_count(shape) * num_tokens / flops


def print_probe_roofline(probe: dict, shape: str, flops: float) -> float:
    bound_ms = prefill_s(shape, probe["new_tokens_mean"], flops) * 1e3
    print(f"  retained-vs-fresh: a prefill of its {probe['new_tokens_mean']:.0f} new tokens >= {bound_ms:.2f} ms; "
          f"retained turn p50 {probe['retained_ttft_p50_ms']:.1f} ms ({probe['retained_ttft_p50_ms'] / bound_ms:.1f}x), "
          f"fresh prompt of those tokens p50 {probe['fresh_ttft_p50_ms']:.1f} ms "
          f"({probe['fresh_ttft_p50_ms'] / bound_ms:.1f}x); retained / fresh {probe['retained_over_fresh']:.2f} "
          f"(target <= 1.5)")
    return bound_ms
