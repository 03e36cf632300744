"""Why a served burst's first step is slow: the engine alone, warmed by a full pass, then one lone
request after an idle pause of each length, every step timed to the device's end.

    python loadtests/idle_step_probe.py --shape llama-3.2-1b --idle 0,0.5,3 [--profile]

For each pause it prints the lone request's steps (ms, with the synchronize that ends each) and,
with --profile, the host functions of the first step after the longest pause (cProfile, top 25 by
cumulative time). A step that is slow only after a pause points at the idle device or host
(clocks, the allocator's caches); one slow at every pause at the host path of a lone request.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from shapes import SHAPES, write_shape  # noqa: E402
from workload import add_engine_args, add_shape_arg, random_prompts  # noqa: E402


def timed_lone_request(llm, prompt: list[int], max_tokens: int, profile: bool) -> list[float]:
    """Each step of one request from add to finish: wall ms of step() plus the device's drain."""
    import torch

    from splitserve.shared.sampling_params import SamplingParams

    engine = llm.engine
    engine.add_request(f"lone-{time.monotonic_ns()}", prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                                              ignore_eos=True))
    times, profiler = [], cProfile.Profile() if profile else None
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        if profiler is not None and not times:
            profiler.enable()
        engine.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if profiler is not None and not times:
            profiler.disable()
        times.append((time.perf_counter() - start) * 1e3)
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_arg(parser, "llama-3.2-1b")
    add_engine_args(parser, max_num_batched_tokens=16384, gpu_memory_utilization=0.4)
    parser.add_argument("--idle", default="0,0.5,3", help="pauses in seconds before each lone request")
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--warm-prompts", type=int, default=256)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--no-async", action="store_true")
    args = parser.parse_args()

    from splitserve.shared.llm import LLM
    from splitserve.shared.sampling_params import SamplingParams

    model_dir = write_shape(args.shape, tempfile.mkdtemp(prefix="idle-probe-"))
    llm = LLM(model_dir, load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              gpu_memory_utilization=args.gpu_memory_utilization, async_scheduling=not args.no_async)
    vocab = SHAPES[args.shape]["vocab_size"]
    warm = random_prompts(args.warm_prompts, args.input_len, vocab, seed=1)
    llm.generate([{"prompt_token_ids": p} for p in warm], SamplingParams(temperature=0.0, max_tokens=128,
                                                                         ignore_eos=True))
    pauses = [float(p) for p in args.idle.split(",")]
    lone = random_prompts(2 * len(pauses), args.input_len, vocab, seed=2)
    for pause, (first, again) in zip(pauses, probe(llm, pauses, lone, args.profile)):
        print(f"idle {pause:>4} s: lone request steps ms {[round(t, 2) for t in first]}; "
              f"right after, another {[round(t, 2) for t in again]}", flush=True)


def probe(llm, pauses: list[float], prompts: list[list[int]], profile: bool = False, max_tokens: int = 4):
    """For each pause: sleep, then time one lone request, then another right after (two prompts a
    pause); with `profile`, the first step after the longest pause is profiled."""
    results = []
    for n, pause in enumerate(pauses):
        time.sleep(pause)
        first = timed_lone_request(llm, prompts[2 * n], max_tokens, profile and pause == max(pauses))
        results.append((first, timed_lone_request(llm, prompts[2 * n + 1], max_tokens, False)))
    return results

if __name__ == "__main__":
    main()
