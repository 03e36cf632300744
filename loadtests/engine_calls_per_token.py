"""The engine's Python work per request per decode step, counted, not timed: cProfile's function
calls (every Python function and builtin the step loop enters) divided by the request-steps.

    python loadtests/engine_calls_per_token.py                                   # CPU, tiny model
    python loadtests/engine_calls_per_token.py --device cuda --shape llama-3.2-1b \
        --num-prompts 256 --input-len 512 --output-len 128                       # the H200 workload

The decode step of a large batch is host-bound on a fast GPU: its pace is the Python the step
loop runs for every request. Times move with the host's clock and load; call counts do not, so
two commits compare on any machine. Measured on `EngineCore.step()` alone (no LLM wrapper, no
tokenizer), for sync and async scheduling (async is forced on CPU; it is the GPU's default), over
the decode steps while every request runs (`steady`: the per-step cost) and over the whole run
from the first prefill to the last finish (`run`: per output token). `engine` counts only the
calls made in the engine's own files (shared/, without the model), the part this measure guards;
`all` adds torch's and the model's. The times come from an unprofiled pass (medians over the
decode steps of all requests; indicative: they depend on the machine and its load): the whole
step, and the step outside the model's forward (on CPU the host's own work; on a GPU, with async
scheduling, it also holds the waits for the device).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from shapes import SHAPES, write_shape  # noqa: E402
from workload import add_shape_arg, add_workload_args, random_prompts  # noqa: E402

import splitserve.shared  # noqa: E402

_SHARED = os.path.dirname(os.path.abspath(splitserve.shared.__file__)) + os.sep
_MODEL = _SHARED + "model" + os.sep


def build_engine(model_dir: str, device: str, num_prompts: int, max_len: int, async_scheduling: bool,
                 max_num_batched_tokens: int):
    from splitserve.shared.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from splitserve.shared.engine import EngineCore

    config = EngineConfig(
        model=ModelConfig(model_dir, "auto", device, max_len, "dummy" if not _has_weights(model_dir) else "auto"),
        cache=CacheConfig(block_size=16, gpu_memory_utilization=0.85, cpu_kv_cache_gib=0.25),
        scheduler=SchedulerConfig(max_num_seqs=num_prompts, max_num_batched_tokens=max_num_batched_tokens,
                                  async_scheduling=async_scheduling),
    )
    return EngineCore(config)


def _has_weights(model_dir: str) -> bool:
    return any(name.endswith(".safetensors") for name in os.listdir(model_dir))


def add_requests(engine, prompts: list[list[int]], output_len: int, tag: str) -> None:
    from splitserve.shared.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", prompt, params)


def all_decoding(engine, num: int) -> bool:
    """Every request runs, its prompt computed and its first token out (the next step decodes all)."""
    running = engine.scheduler.running
    return len(running) == num and all(r.num_computed_tokens >= r.num_prompt_tokens and r.output_token_ids
                                       for r in running)


def engine_calls(stats: pstats.Stats) -> tuple[int, int]:
    """(calls the engine's own code makes: its functions plus what they call directly, such as
    builtins and dataclass constructors; all calls)."""
    total = engine = 0
    for (filename, _, _), (_, ncalls, _, _, callers) in stats.stats.items():
        total += ncalls
        if _is_engine_file(filename):
            engine += ncalls
        else:
            engine += sum(c[1] for (caller_file, _, _), c in callers.items() if _is_engine_file(caller_file))
    return engine, total


def _is_engine_file(filename: str) -> bool:
    return filename.startswith(_SHARED) and not filename.startswith(_MODEL)


def profiled(fn) -> pstats.Stats:
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    return pstats.Stats(prof)


def timed_decode_steps(engine, num: int) -> tuple[float, float]:
    """Run the engine dry; (median wall ms of a decode step of all `num` requests, median ms of
    such a step outside the model's forward: the host's own work, where the forward is synchronous
    as on CPU; on a GPU it also holds waits for the device)."""
    runner, forward, forward_s = engine.runner, engine.runner._forward, [0.0]

    def timed_forward(inputs):
        t0 = time.perf_counter()
        out = forward(inputs)
        forward_s[0] += time.perf_counter() - t0
        return out

    runner._forward = timed_forward
    steps, outside = [], []
    try:
        while engine.has_unfinished_requests():
            decoding, forward_s[0] = all_decoding(engine, num), 0.0
            t0 = time.perf_counter()
            engine.step()
            if decoding:
                steps.append(time.perf_counter() - t0)
                outside.append(steps[-1] - forward_s[0])
    finally:
        runner._forward = forward
    return 1e3 * statistics.median(steps), 1e3 * statistics.median(outside)


def measure(model_dir: str, device: str, prompts: list[list[int]], output_len: int, async_scheduling: bool,
            max_num_batched_tokens: int, steady_steps: int, top: int = 0) -> dict[str, float]:
    """Calls per request-step (steady decode) and per output token (whole run), and ms per step."""
    num = len(prompts)
    engine = build_engine(model_dir, device, num, len(prompts[0]) + output_len, async_scheduling,
                          max_num_batched_tokens)
    try:
        # An unprofiled pass first: it warms every path and gives the times.
        add_requests(engine, prompts, output_len, "warm")
        step_ms, outside_ms = timed_decode_steps(engine, num)
        add_requests(engine, prompts, output_len, "run")
        run_stats = profiled(lambda: _drain(engine))
        add_requests(engine, prompts, output_len, "steady")
        while not all_decoding(engine, num):
            engine.step()
        steady_steps = min(steady_steps, output_len - 4)
        steady_stats = profiled(lambda: [engine.step() for _ in range(steady_steps)])
        if not all_decoding(engine, num):
            raise RuntimeError("a request finished inside the steady window: raise --output-len")
        _drain(engine)
    finally:
        engine.close()
    if top:
        steady_stats.sort_stats("ncalls").print_stats(top)
    steady_engine, steady_all = engine_calls(steady_stats)
    run_engine, run_all = engine_calls(run_stats)
    request_steps, tokens = steady_steps * num, num * output_len
    return {"steady_engine": steady_engine / request_steps, "steady_all": steady_all / request_steps,
            "run_engine": run_engine / tokens, "run_all": run_all / tokens,
            "step_ms": step_ms, "outside_forward_ms": outside_ms}


def _drain(engine) -> None:
    while engine.has_unfinished_requests():
        engine.step()


def tiny_model_dir() -> str:
    return write_shape("pipeline-tiny", tempfile.mkdtemp(prefix="calls-"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arg(parser, "pipeline-tiny")
    parser.add_argument("--model", default=None, help="checkpoint dir (default: --shape with dummy weights)")
    parser.add_argument("--device", default="cpu")
    add_workload_args(parser, num_prompts=256, input_len=16, output_len=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--steady-steps", type=int, default=32)
    parser.add_argument("--modes", default="sync,async", help="comma-separated: sync, async")
    parser.add_argument("--top", type=int, default=0, help="print the N most called functions of each steady window")
    args = parser.parse_args()
    model_dir = args.model or write_shape(args.shape, tempfile.mkdtemp(prefix="calls-"))
    vocab = SHAPES[args.shape]["vocab_size"] if args.model is None else 256
    prompts = random_prompts(args.num_prompts, args.input_len, vocab, low=min(1000, vocab // 4))
    print(f"{args.num_prompts} requests x ({args.input_len} -> {args.output_len}), {args.shape if not args.model else args.model}"
          f" on {args.device}; calls = cProfile ncalls")
    print(f"{'scheduling':<11} {'engine/req-step':>16} {'all/req-step':>13} {'engine/token':>13} {'all/token':>10}"
          f" {'step ms':>8} {'outside forward ms':>19}")
    for mode in args.modes.split(","):
        r = measure(model_dir, args.device, prompts, args.output_len, mode == "async", args.max_num_batched_tokens,
                    args.steady_steps, args.top)
        print(f"{mode:<11} {r['steady_engine']:>16.1f} {r['steady_all']:>13.1f} {r['run_engine']:>13.1f}"
              f" {r['run_all']:>10.1f} {r['step_ms']:>8.2f} {r['outside_forward_ms']:>19.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
