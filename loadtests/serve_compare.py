"""Serving benchmark of the whole stack, colocated vs disaggregated, printed side by side.

For each topology this starts the real local stack (`splitserve up`: gateway, workers, gRPC, ZMQ,
UCX), runs the serving client (`bench_serve.py`) against the gateway at each request rate, reads the
gateway's /metrics (KV bytes moved, tokens recomputed), and stops the stack with Ctrl-C. One table
compares the topologies at every rate.

    python loadtests/serve_compare.py --shape llama-3.2-1b --rates 4,16,inf --num-prompts 200 \\
        --input-len 1024 --output-len 128 --gpu-memory-utilization 0.4 --goodput tpot:20

On one GPU both topologies share it: the disaggregated stack runs a prefill and a decode process
side by side (KV over UCX cuda_ipc), each with `--gpu-memory-utilization` of the memory. On two
GPUs the launcher puts prefill on GPU 0 and decode on GPU 1; compare with `--colocated-workers 2`
(one colocated worker per GPU), and `--transfer-backend nccl` for the NCCL path:

    python loadtests/serve_compare.py --colocated-workers 2 --gpu-memory-utilization 0.9 \
        --ucx-tls cuda_copy,cuda_ipc,tcp --rates 2,8,32,inf --input-len 4096 --goodput tpot:30 The model
is `--shape` with random weights (`--load-format dummy`) and a word-level tokenizer with one word per
token id, or `--model DIR`. On CPU, `--model demo` serves the demo checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.append(os.path.join(HERE, ".."))  # `loadtests` as a package, for bench_serve (last: the
# repo's splitserve/ folder must not shadow the installed package, whose subpackages live elsewhere)
sys.path.insert(0, os.path.join(HERE, "..", "tests", "services"))

from shapes import SHAPES, write_shape  # noqa: E402
from workload import (add_engine_args, add_model_arg, add_shape_arg, add_start_together_arg,  # noqa: E402
                      add_workload_args, started_in_turn)
from stack import LocalStack, metric_total  # noqa: E402

def topology_args(name: str, args: argparse.Namespace) -> list[str]:
    """The `splitserve up` flags of a topology. With several GPUs the launcher spreads the workers
    round-robin: the disaggregated pair puts prefill on GPU 0 and decode on GPU 1, and
    `--colocated-workers 2` puts one colocated worker on each, the fair baseline on two GPUs."""
    if name == "colocated":
        return ["--colocated", "--workers", str(args.colocated_workers)]
    return ["--prefill", "1", "--decode", "1", "--transfer-backend", args.transfer_backend]


TOPOLOGIES = ("colocated", "disaggregated")


def model_args(args: argparse.Namespace) -> list[str]:
    if args.model == "demo":
        return []
    if args.model:
        return ["--model", args.model]
    model_dir = write_shape(args.shape, tempfile.mkdtemp(prefix=f"serve-{args.shape}-"))
    vocab_tokenizer(SHAPES[args.shape]["vocab_size"]).save_pretrained(model_dir)
    return ["--model", model_dir, "--load-format", "dummy"]


def vocab_tokenizer(vocab_size: int):
    """A word-level tokenizer with one word per model token id ("w0".."wN"), so every id a
    random-weight model samples decodes to text (the stream is not empty) and counts as one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="w0", eos_token="w1", bos_token="w2")


def add_stack_args_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stack-args", default=[], type=str.split,
                   help="more `splitserve up` flags, one string, e.g. '--session-max-hold-ms 5'")


def topology_stack(name: str, args: argparse.Namespace, model_argv: list[str], out_dir: str) -> LocalStack:
    """The stack of a topology, starting (LocalStack waits for it on entry)."""
    engine_argv = ["--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
                   "--gpu-memory-utilization", str(args.gpu_memory_utilization), "--no-enable-prefix-caching"]
    if args.ucx_tls:
        engine_argv += ["--transfer-ucx-tls", args.ucx_tls]
    gateway_argv = ["--gateway-processes", str(args.gateway_processes)]
    if args.session_window is not None:
        gateway_argv += ["--session-window", str(args.session_window)]
    stack_argv = [*topology_args(name, args), *model_argv, *engine_argv, *gateway_argv, *args.stack_args]
    return LocalStack(stack_argv, os.path.join(out_dir, "cache"), device=args.device)


def run_topology(name: str, args: argparse.Namespace, model_argv: list[str], out_dir: str,
                 on_ready=None, stack: LocalStack | None = None) -> list[dict]:
    """`on_ready()`, when given, is called once the stack is up, just before the load starts.
    `stack`: the topology's stack, already starting (default: started here)."""
    from loadtests import bench_serve

    result_json = os.path.join(out_dir, f"{name}.json")
    with stack or topology_stack(name, args, model_argv, out_dir) as stack:
        argv = ["--base-url", stack.url, "--num-prompts", str(args.num_prompts), "--random-input-len",
                str(args.input_len), "--random-output-len", str(args.output_len), "--ignore-eos",
                "--sweep-rates", args.rates, "--result-json", result_json, "--disable-tqdm", "--seed", str(args.seed)]
        if args.goodput:
            argv += ["--goodput", *args.goodput]
        if getattr(args, "dataset", "random") != "random":
            argv += ["--dataset", args.dataset]
        if on_ready is not None:
            on_ready()
        code = bench_serve.main(argv)
        with urllib.request.urlopen(stack.url + "/metrics", timeout=10) as response:
            metrics = response.read().decode()
    print(f"{name}: bench_serve exit code {code}", flush=True)
    runs = json.load(open(result_json))["runs"]
    for run in runs:  # the gateway's counters cover all rates of this topology together
        run["kv_bytes"] = metric_total(metrics, "splitserve_gateway_kv_transfer_bytes_total")
        run["recomputed_tokens"] = metric_total(metrics, "splitserve_gateway_recomputed_tokens_total")
    return runs


def print_table(results: dict[str, list[dict]], goodput: bool) -> None:
    header = (f"{'topology':14s} {'rate':>6s} {'ok/fail':>9s} {'req/s':>7s} {'out tok/s':>10s} {'TTFT p50':>9s} "
              f"{'TTFT p99':>9s} {'TPOT p50':>9s} {'TPOT p99':>9s} {'ITL p50':>8s} {'ITL p99':>8s} {'gap1 p50':>8s}" + (f" {'goodput':>8s}" if goodput else ""))
    print("\n" + header + "\n" + "-" * len(header))
    rates = [run["request_rate"] for run in next(iter(results.values()))]
    for i, rate in enumerate(rates):
        for name, runs in results.items():
            s = runs[i]["summary"]
            line = (f"{name:14s} {str(rate):>6s} {s['completed']:>4d}/{s['failed']:<4d} {s['request_throughput']:7.2f} "
                    f"{s['output_throughput']:10.0f} {s['ttft']['median_ms']:9.1f} {s['ttft']['percentiles_ms']['p99']:9.1f} "
                    f"{s['tpot']['median_ms']:9.2f} {s['tpot']['percentiles_ms']['p99']:9.2f} "
                    f"{s['itl']['median_ms']:8.2f} {s['itl']['percentiles_ms']['p99']:8.2f} "
                    f"{s['first_gap']['median_ms']:8.2f}")
            if goodput:
                line += f" {s['goodput'] or 0.0:8.2f}"
            print(line)
    print("gap1: first token -> second (disaggregated: the prefill-to-decode hand-off)")
    for name, runs in results.items():
        print(f"{name}: KV moved {runs[0]['kv_bytes'] / 2**20:,.0f} MiB, prompt tokens recomputed "
              f"{runs[0]['recomputed_tokens']:,.0f} (all rates)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arg(p, "llama-3.2-1b")
    add_model_arg(p)
    p.add_argument("--topologies", default="colocated,disaggregated")
    p.add_argument("--colocated-workers", type=int, default=1, help="colocated workers (2 on a 2-GPU machine)")
    p.add_argument("--gateway-processes", type=int, default=1, help="gateway processes on the port (see splitserve up)")
    p.add_argument("--session-window", type=int, default=None, help="the gateway's session credit (default: its own)")
    p.add_argument("--transfer-backend", default="ucx", choices=("ucx", "nccl"), help="KV transfer of the pair")
    p.add_argument("--rates", default="4,16,inf", help="request rates (req/s), comma-separated; inf = all at once")
    add_workload_args(p, num_prompts=200, input_len=1024, output_len=128)
    add_engine_args(p, max_num_batched_tokens=8192, gpu_memory_utilization=0.4,
                    gpu_memory_help="per worker: two disaggregated workers share one GPU")
    p.add_argument("--device", default="auto")
    p.add_argument("--ucx-tls", default=None, help="UCX transports for the disaggregated pair, e.g. tcp,cuda_copy,cuda_ipc")
    p.add_argument("--goodput", nargs="*", default=[], metavar="METRIC:MS")
    add_stack_args_flag(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=None,
                   help="where the JSON results go: one per topology from bench_serve, and compare.json")
    add_start_together_arg(p)
    args = p.parse_args(argv)
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="serve-compare-")
    os.makedirs(out_dir, exist_ok=True)
    model_argv = model_args(args)
    names = args.topologies.split(",")
    for name in names:
        if name not in TOPOLOGIES:
            p.error(f"unknown topology {name!r}; choose from {TOPOLOGIES}")
    results = {}
    with contextlib.ExitStack() as started:
        for name, stack in started_in_turn(lambda name: topology_stack(name, args, model_argv, out_dir), names,
                                           args.start_stacks_together, started):
            results[name] = run_topology(name, args, model_argv, out_dir, stack=stack)
    print(f"\n{args.num_prompts} requests x ({args.input_len} in -> {args.output_len} out) per rate, "
          f"model {args.model or args.shape}, device {args.device}; latencies in ms")
    print_table(results, bool(args.goodput))
    with open(os.path.join(out_dir, "compare.json"), "w") as f:
        json.dump({"args": vars(args), "results": {name: [{k: v for k, v in run.items() if k != "requests"}
                                                          for run in runs] for name, runs in results.items()}}, f, indent=1)
    failed = sum(run["summary"]["failed"] for runs in results.values() for run in runs)
    if failed:
        print(f"{failed} requests failed; first errors: "
              f"{[e for runs in results.values() for run in runs for e in run['summary']['errors']][:3]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
