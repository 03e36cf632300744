"""The engine alone against the served stack, alternating in one run, with every process's CPU.

    python loadtests/engine_vs_served.py --shape llama-3.2-1b --num-prompts 256 --input-len 512 \\
        --output-len 128 --rounds 2 --gpu-memory-utilization 0.4

Each round runs, one after the other, on the same engine settings:

    engine alone    the offline engine (`LLM.generate`, as bench_offline.py) in a process of its own:
                    every prompt at once, ignore_eos; a cold pass, then the timed pass
    colocated       `splitserve up --colocated` driven by bench_serve.py at rate inf, a cold pass
                    then the timed pass on the same stack, as the engine alone gets (the cold pass
                    opens the gateways' connections and worker sessions)
    disaggregated   a prefill and a decode worker on the same device, KV over UCX (or NCCL)

While each phase runs, the CPU of every Python process on the machine is sampled (total and main
thread, loadtests/cpu_sample.py), labelled by role (gateway, worker serving process, engine
process, bench client), and the busiest single thread is named: a main thread near one core is the
next bottleneck; none near one core means the device sets the pace. The table gives output tok/s
and each served run's share of the engine alone in the same round.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import cpu_sample  # noqa: E402
import serve_compare  # noqa: E402  (puts the repo and tests/services on the path too)
from workload import add_engine_args, add_model_arg, add_shape_arg, add_workload_args, random_prompts  # noqa: E402

SATURATED_CORES = 0.85
"""A thread this busy on average is treated as saturated (it cannot go faster)."""


# ---- the engine alone (runs in a child process: `--engine-alone-json PATH`) --------------------

def run_engine_alone(args: argparse.Namespace) -> None:
    import torch

    from splitserve.shared.llm import LLM
    from splitserve.shared.sampling_params import SamplingParams

    options = dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                   gpu_memory_utilization=args.gpu_memory_utilization, enable_prefix_caching=False,
                   skip_tokenizer_init=True, device=args.device)
    if args.model_dir:
        options.update(load_format=args.load_format)
    llm = LLM(args.model_dir or None, step_trace=args.step_trace, **options)
    if args.dataset == "sharegpt-synthetic":  # the very prompts and lengths bench_serve sends
        from loadtests.datasets import sharegpt_synthetic_requests

        samples = sharegpt_synthetic_requests(args.num_prompts, as_token_ids=True, seed=args.seed)
        prompts = [{"prompt_token_ids": s.prompt} for s in samples]
        params = [SamplingParams(temperature=0.0, max_tokens=s.expected_output_len, ignore_eos=True) for s in samples]
    else:
        prompts = [{"prompt_token_ids": p}
                   for p in random_prompts(args.num_prompts, args.input_len, 4096, low=0, seed=args.seed)]
        params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    sync = torch.cuda.synchronize if torch.cuda.is_available() and args.device != "cpu" else (lambda: None)
    elapsed = 0.0
    for _ in ("cold", "timed"):  # the cold pass pays one-time costs (compiles, allocator growth)
        sync()
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        sync()
        elapsed = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    with open(args.engine_alone_json, "w") as f:
        json.dump({"elapsed_s": elapsed, "output_tokens": produced}, f)


def engine_alone_phase(args: argparse.Namespace, model_argv: list[str], out_path: str, trace: str | None) -> dict:
    model_dir = model_argv[model_argv.index("--model") + 1] if "--model" in model_argv else ""
    argv = [sys.executable, os.path.abspath(__file__), "--engine-alone-json", out_path, "--model-dir", model_dir,
            "--load-format", "dummy" if "dummy" in model_argv else "auto", *_shared_argv(args)]
    if trace:
        argv += ["--step-trace", trace]
    env = dict(os.environ, SPLITSERVE_CACHE=os.path.join(os.path.dirname(out_path), "cache"))  # the stacks' demo
    subprocess.run(argv, check=True, timeout=args.phase_timeout_s, env=env)
    result = json.load(open(out_path))
    return {"output_throughput": result["output_tokens"] / result["elapsed_s"], "summary": None}


def _shared_argv(args: argparse.Namespace) -> list[str]:
    return ["--num-prompts", str(args.num_prompts), "--input-len", str(args.input_len), "--output-len",
            str(args.output_len), "--dataset", args.dataset, "--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens",
            str(args.max_num_batched_tokens), "--gpu-memory-utilization", str(args.gpu_memory_utilization),
            "--device", args.device, "--seed", str(args.seed)]


def served_phase(name: str, args: argparse.Namespace, model_argv: list[str], out_dir: str,
                 trace: str | None, on_ready=None) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    phase_args = argparse.Namespace(**vars(args))
    if trace:  # every engine of the stack writes its own file ({pid})
        phase_args.stack_args = [*args.stack_args, "--step-trace", trace.replace(".csv", "-{pid}.csv")]
    run = serve_compare.run_topology(name, phase_args, model_argv, out_dir, on_ready)[-1]  # the timed pass
    return {"output_throughput": run["summary"]["output_throughput"], "summary": run["summary"]}


# ---- CPU of every process, per phase ---------------------------------------------------------

class PhaseSampler:
    """A thread sampling every Python process's CPU; samples are filed under the current phase."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.phase: str | None = None
        self.samples: dict[str, dict[tuple[int, str], list[tuple[float, float]]]] = {}
        self.parents: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "PhaseSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        previous, previous_t = cpu_sample.snapshot(), time.monotonic()
        while not self._stop.wait(self.interval_s):
            current, now = cpu_sample.snapshot(), time.monotonic()
            ticks = cpu_sample.TICKS_PER_S * (now - previous_t)
            phase = self.phase
            for pid, (cmdline, total, main) in current.items():
                if phase is None or pid not in previous:
                    continue
                self.parents.setdefault(pid, _parent_pid(pid))
                self.samples.setdefault(phase, {}).setdefault((pid, cmdline), []).append(
                    ((total - previous[pid][1]) / ticks, (main - previous[pid][2]) / ticks))
            previous, previous_t = current, now


def _parent_pid(pid: int) -> int:
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError):
        return 0


def process_role(pid: int, cmdline: str, commands: dict[int, str], parents: dict[int, int]) -> str | None:
    """A short name for a process of the benchmark, or None for one that is not part of it."""
    for role in ("gateway", "prefill", "decode", "worker"):
        if f"splitserve.cli {role} " in cmdline:
            return "gateway" if role == "gateway" else f"{role} serving"
    if "splitserve.cli up" in cmdline:
        return "launcher"
    if "--engine-alone-json" in cmdline:
        return "engine alone"
    if "multiprocessing" in cmdline and "resource_tracker" not in cmdline:
        parent = commands.get(parents.get(pid, 0), "")
        for role in ("prefill", "decode", "worker"):
            if f"splitserve.cli {role} " in parent:
                return f"{role} engine process"
        if "--engine-alone-json" in parent:
            return "engine alone"
    if pid == os.getpid():
        return "bench client"
    return None


def phase_cpu(series: dict[tuple[int, str], list[tuple[float, float]]], parents: dict[int, int]) -> list[tuple]:
    """(role, pid, mean total cores, mean main-thread cores, peak total) over the busy samples, and
    the mean total cores over the whole phase (a process busy for a moment has a high busy mean)."""
    commands = {pid: cmdline for pid, cmdline in series}
    rows = []
    for (pid, cmdline), values in series.items():
        role = process_role(pid, cmdline, commands, parents)
        busy = [v for v in values if v[0] >= 0.05]
        if role is None or not busy:
            continue
        rows.append((role, pid, sum(v[0] for v in busy) / len(busy), sum(v[1] for v in busy) / len(busy),
                     max(v[0] for v in values), sum(v[0] for v in values) / len(values)))
    return sorted(rows, key=lambda row: -row[2])


def bottleneck(rows: list[tuple]) -> str:
    if not rows:
        return "no process of the benchmark was sampled busy"
    role, pid, _, main = max(rows, key=lambda row: row[3])[:4]
    if main >= SATURATED_CORES:
        return f"{role} (pid {pid}): its main thread runs at {main:.2f} cores, the next bottleneck"
    return (f"no thread is saturated (busiest main thread: {role}, {main:.2f} cores): the device or the "
            "engine's kernels set the pace")


# ---- engine step traces (--step-trace-dir) ---------------------------------------------------

def _trace_path(args: argparse.Namespace, rnd: int, name: str) -> str | None:
    if not args.step_trace_dir:
        return None
    os.makedirs(args.step_trace_dir, exist_ok=True)
    return os.path.join(args.step_trace_dir, f"r{rnd}-{name.replace(' ', '-')}.csv")


def print_step_traces(trace_dir: str) -> None:
    """Each engine's steps in its phase's last burst: the engine alone's against the served ones'."""
    import step_trace_summary

    print("\nEngine steps (last burst of each trace; decode = one token per request; ms are medians):")
    print(step_trace_summary.HEADER)
    for name in sorted(os.listdir(trace_dir)):
        steps = step_trace_summary.read_trace(os.path.join(trace_dir, name))
        print(step_trace_summary.format_row(name, step_trace_summary.summarize(step_trace_summary.last_burst(steps, 0.5))))


# ---- the run ---------------------------------------------------------------------------------

def print_report(results: list[tuple[int, str, dict]], cpu: dict[str, list[tuple]], args) -> None:
    shape = f"({args.input_len} in -> {args.output_len} out)" if args.dataset == "random" else f"({args.dataset})"
    print(f"\n{args.num_prompts} requests x {shape}, ignore_eos, rate inf, "
          f"model {args.model or args.shape}, device {args.device}; latencies in ms")
    header = (f"{'round':>5s} {'system':16s} {'out tok/s':>10s} {'of engine':>10s} {'TTFT p50':>9s} "
              f"{'TPOT p50':>9s} {'ITL p50':>8s} {'ITL p99':>8s}")
    print(header + "\n" + "-" * len(header))
    engine = {rnd: r["output_throughput"] for rnd, name, r in results if name == "engine alone"}
    for rnd, name, r in results:
        line = f"{rnd:5d} {name:16s} {r['output_throughput']:10.0f} {r['output_throughput'] / engine[rnd]:9.0%}"
        s = r["summary"]
        if s:
            line += (f" {s['ttft']['median_ms']:9.1f} {s['tpot']['median_ms']:9.2f} {s['itl']['median_ms']:8.2f}"
                     f" {s['itl']['percentiles_ms']['p99']:8.2f}")
        print(line)
    print("\nCPU per process, mean cores while busy (total / main thread), per phase:")
    for phase, rows in cpu.items():
        print(f"  {phase}")
        for role, pid, total, main, peak, *whole in rows:
            phase_mean = f", phase mean {whole[0]:.2f}" if whole else ""
            print(f"    {role:24s} pid {pid:7d}  {total:5.2f} / {main:5.2f}  (peak {peak:.2f}{phase_mean})")
        print(f"    -> {bottleneck(rows)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arg(p, "llama-3.2-1b")
    add_model_arg(p)
    p.add_argument("--topologies", default="colocated,disaggregated")
    p.add_argument("--rounds", type=int, default=2, help="rounds of (engine alone, each topology)")
    add_workload_args(p, num_prompts=256, input_len=512, output_len=128)
    p.add_argument("--dataset", default="random", choices=("random", "sharegpt-synthetic"),
                   help="sharegpt-synthetic: ShareGPT-like lengths (loadtests/datasets.py); --input-len and "
                        "--output-len then do not apply")
    add_engine_args(p, max_num_batched_tokens=8192, gpu_memory_utilization=0.4,
                    gpu_memory_help="per engine: the disaggregated pair shares one GPU")
    p.add_argument("--device", default="auto")
    p.add_argument("--gateway-processes", type=int, default=1)
    p.add_argument("--session-window", type=int, default=None)
    p.add_argument("--transfer-backend", default="ucx", choices=("ucx", "nccl"))
    p.add_argument("--ucx-tls", default=None)
    serve_compare.add_stack_args_flag(p)
    p.add_argument("--cpu-interval-s", type=float, default=0.5)
    p.add_argument("--phase-timeout-s", type=float, default=1800.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=None)
    p.add_argument("--step-trace-dir", default=None,
                   help="every engine writes --step-trace files here; their summary follows the table")
    p.add_argument("--step-trace", default=None, help=argparse.SUPPRESS)  # the engine-alone child's file
    p.add_argument("--engine-alone-json", default=None, help=argparse.SUPPRESS)  # the child's mode
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--load-format", default="auto", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.engine_alone_json:
        run_engine_alone(args)
        return 0
    args.rates, args.goodput, args.colocated_workers = "inf,inf", [], 1  # what serve_compare.run_topology reads
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="engine-vs-served-")
    os.makedirs(out_dir, exist_ok=True)
    model_argv = serve_compare.model_args(args)
    results: list[tuple[int, str, dict]] = []
    with PhaseSampler(args.cpu_interval_s) as sampler:
        for rnd in range(1, args.rounds + 1):
            for name in ["engine alone", *args.topologies.split(",")]:
                phase = f"round {rnd} {name}"
                trace = _trace_path(args, rnd, name)
                if name == "engine alone":
                    sampler.phase = phase
                    result = engine_alone_phase(args, model_argv, os.path.join(out_dir, f"engine-{rnd}.json"), trace)
                else:  # sampled from when the stack is up: its start-up would hide who is busy under load
                    result = served_phase(name, args, model_argv, out_dir, trace,
                                          on_ready=lambda phase=phase: setattr(sampler, "phase", phase))
                sampler.phase = None
                results.append((rnd, name, result))
                print(f"round {rnd} {name}: {result['output_throughput']:.0f} output tok/s", flush=True)
    cpu = {phase: phase_cpu(series, sampler.parents) for phase, series in sampler.samples.items()}
    print_report(results, cpu, args)
    if args.step_trace_dir:
        print_step_traces(args.step_trace_dir)
    with open(os.path.join(out_dir, "engine_vs_served.json"), "w") as f:
        json.dump({"args": vars(args), "results": [{"round": rnd, "system": name, **r} for rnd, name, r in results],
                   "cpu": cpu}, f, indent=1)
    failed = sum(r["summary"]["failed"] for _, _, r in results if r["summary"])
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
