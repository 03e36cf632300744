"""splitserve against vLLM for CPU on the same checkpoint, both driven by vLLM's own client.

    python loadtests/vllm_cpu_compare.py --vllm-venv /work/vllm-venv --model DIR --rounds 2

Each round starts one server, runs `vllm bench serve` against it (random dataset, 64 prompts of
256 tokens -> 64 tokens, ignore_eos, max concurrency 16, unless told otherwise), stops it, then does
the same for the other, so a shared, loaded machine slows both alike:

    splitserve   `splitserve up --colocated` (gateway + one colocated worker, its engine process)
    vllm         `vllm serve DIR` from the venv given (vLLM stays out of this project's dependencies)

`--systems` names them, space-separated; a system `splitserve:FLAGS` is splitserve with more `up`
flags (comma-separated, e.g. `--systems splitserve splitserve:--dtype=bfloat16,--cpu-threads=2
vllm`), so settings can be A/B'd in the same run.

The table gives output tok/s, TTFT, TPOT and ITL as vLLM's client measured them, and splitserve's
output tok/s as a share of vLLM's in the same round. `--model` defaults to the demo checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from workload import add_model_arg, add_workload_args  # noqa: E402

STOP_TIMEOUT_S = 30.0


def server_argv(system: str, args: argparse.Namespace, port: int) -> list[str]:
    name, _, extra = system.partition(":")
    if name == "splitserve":
        return [sys.executable, "-m", "splitserve.cli", "up", "--colocated", "--port", str(port),
                "--worker-base-port", str(port + 1), "--model", args.model, "--device", "cpu",
                "--max-model-len", str(args.max_model_len), "--no-enable-prefix-caching",
                *[flag for flag in extra.split(",") if flag]]
    return [os.path.join(args.vllm_venv, "bin", "vllm"), "serve", args.model, "--port", str(port),
            "--max-model-len", str(args.max_model_len), "--no-enable-prefix-caching", *args.vllm_serve_args]


def wait_ready(process: subprocess.Popen, url: str, timeout_s: float) -> str:
    """The served model id, once /v1/models answers."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode} during start-up")
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=2) as response:
                return json.load(response)["data"][0]["id"]
        except OSError:
            time.sleep(1.0)
    raise TimeoutError(f"server at {url} not ready within {timeout_s:.0f} s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def bench(system: str, args: argparse.Namespace, out_dir: str, rnd: int) -> dict:
    port = args.port
    url = f"http://127.0.0.1:{port}"
    label = "".join(c if c.isalnum() or c in "-_" else "_" for c in system)
    log = open(os.path.join(out_dir, f"{label}-{rnd}.log"), "w")
    process = subprocess.Popen(server_argv(system, args, port), stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        model_id = wait_ready(process, url, args.start_timeout_s)
        result = os.path.join(out_dir, f"{label}-{rnd}.json")
        subprocess.run([os.path.join(args.vllm_venv, "bin", "vllm"), "bench", "serve", "--backend", "openai",
                        "--base-url", url, "--model", model_id, "--tokenizer", args.model, "--dataset-name", "random",
                        "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
                        "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.max_concurrency),
                        "--ignore-eos", "--seed", str(args.seed), "--percentile-metrics", "ttft,tpot,itl",
                        "--metric-percentiles", "50,99", "--save-result", "--result-filename", result],
                       check=True, timeout=args.bench_timeout_s)
        return json.load(open(result))
    finally:
        stop(process)
        log.close()


def print_table(rows: list[tuple[int, str, dict]], args: argparse.Namespace) -> None:
    print(f"\n{args.num_prompts} prompts x ({args.input_len} -> {args.output_len}), max concurrency "
          f"{args.max_concurrency}, ignore_eos, model {args.model}, measured by `vllm bench serve`; ms")
    width = max(11, *(len(system) for _, system, _ in rows))
    header = (f"{'round':>5s} {'system':{width}s} {'out tok/s':>10s} {'vs vLLM':>8s} {'TTFT p50':>9s} {'TTFT p99':>9s} "
              f"{'TPOT p50':>9s} {'ITL p50':>8s} {'ITL p99':>8s}")
    print(header + "\n" + "-" * len(header))
    vllm = {rnd: r["output_throughput"] for rnd, system, r in rows if system == "vllm"}
    for rnd, system, r in rows:
        share = f"{r['output_throughput'] / vllm[rnd]:7.2f}x" if vllm.get(rnd) else "      -"
        print(f"{rnd:5d} {system:{width}s} {r['output_throughput']:10.1f} {share:>8s} {r.get('median_ttft_ms', 0):9.1f} "
              f"{r.get('p99_ttft_ms', 0):9.1f} {r.get('median_tpot_ms', 0):9.2f} {r.get('median_itl_ms', 0):8.2f} "
              f"{r.get('p99_itl_ms', 0):8.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vllm-venv", default="/work/vllm-venv", help="a venv with vllm-cpu installed")
    add_model_arg(p, help="checkpoint dir (default: the demo checkpoint)")
    p.add_argument("--systems", nargs="+", default=["splitserve", "vllm"],
                   help="servers to run each round, in order: splitserve, splitserve:FLAG,FLAG..., vllm")
    p.add_argument("--rounds", type=int, default=2)
    add_workload_args(p, num_prompts=64, input_len=256, output_len=64)
    p.add_argument("--max-concurrency", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--port", type=int, default=8765, help="each server's HTTP port (splitserve's workers: next ports)")
    p.add_argument("--vllm-serve-args", type=str.split, default=["--gpu-memory-utilization", "0.1"],
                   help="flags for `vllm serve`, one string; on CPU --gpu-memory-utilization is the share of host "
                        "memory vLLM takes, and the default 0.92 fails on a machine whose memory others use")
    p.add_argument("--start-timeout-s", type=float, default=600.0)
    p.add_argument("--bench-timeout-s", type=float, default=1800.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    if not os.path.exists(os.path.join(args.vllm_venv, "bin", "vllm")):
        p.error(f"no vllm in {args.vllm_venv}: install vllm-cpu there (its own venv), or pass --vllm-venv")
    if args.model is None:
        from splitserve.shared.demo import resolve_model_dir

        args.model = resolve_model_dir(None)
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="vllm-cpu-compare-")
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for rnd in range(1, args.rounds + 1):
        for system in args.systems:
            rows.append((rnd, system, bench(system, args, out_dir, rnd)))
            print(f"round {rnd} {system}: {rows[-1][2]['output_throughput']:.1f} output tok/s", flush=True)
    print_table(rows, args)
    with open(os.path.join(out_dir, "vllm_cpu_compare.json"), "w") as f:
        json.dump({"args": vars(args), "rows": [{"round": rnd, "system": s, **r} for rnd, s, r in rows]}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
