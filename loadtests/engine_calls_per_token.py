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
`all` adds torch's and the model's. The CPU ms per step comes from an unprofiled pass
(indicative: it depends on the machine).
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


def profiled(fn) -> tuple[pstats.Stats, float]:
    prof = cProfile.Profile()
    t0 = time.process_time()
    prof.enable()
    fn()
    prof.disable()
    return pstats.Stats(prof), time.process_time() - t0


def measure(model_dir: str, device: str, prompts: list[list[int]], output_len: int, async_scheduling: bool,
            max_num_batched_tokens: int, steady_steps: int, top: int = 0) -> dict[str, float]:
    """Calls per request-step (steady decode) and per output token (whole run), and CPU ms per step."""
    num = len(prompts)
    engine = build_engine(model_dir, device, num, len(prompts[0]) + output_len, async_scheduling,
                          max_num_batched_tokens)
    try:
        # An unprofiled pass first: warms every path (and the caches of the allocator) and gives the time.
        add_requests(engine, prompts, output_len, "warm")
        steps, cpu_s = 0, 0.0
        while engine.has_unfinished_requests():
            decoding = all_decoding(engine, num)
            t0 = time.process_time()
            engine.step()
            if decoding:
                cpu_s, steps = cpu_s + time.process_time() - t0, steps + 1
        add_requests(engine, prompts, output_len, "run")
        run_stats, _ = profiled(lambda: _drain(engine))
        add_requests(engine, prompts, output_len, "steady")
        while not all_decoding(engine, num):
            engine.step()
        steady_steps = min(steady_steps, output_len - 4)
        steady_stats, _ = profiled(lambda: [engine.step() for _ in range(steady_steps)])
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
            "cpu_ms_per_step": 1e3 * cpu_s / max(steps, 1)}


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
          f" {'CPU ms/step':>12}")
    for mode in args.modes.split(","):
        r = measure(model_dir, args.device, prompts, args.output_len, mode == "async", args.max_num_batched_tokens,
                    args.steady_steps, args.top)
        print(f"{mode:<11} {r['steady_engine']:>16.1f} {r['steady_all']:>13.1f} {r['run_engine']:>13.1f}"
              f" {r['run_all']:>10.1f} {r['cpu_ms_per_step']:>12.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
