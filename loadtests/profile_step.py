"""Where one engine step's time goes, on the GPU: host phases (schedule, input prep, forward,
sampling, update) timed with syncs, then the top CUDA kernels of a decode and a prefill step.

    python loadtests/profile_step.py --shape llama-3.2-1b --batch 256 --context 512
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

from bench_step import wall_ms_per_step  # noqa: E402
from shapes import SHAPES, write_shape  # noqa: E402
from workload import add_shape_arg  # noqa: E402
from splitserve.shared.llm import LLM  # noqa: E402
from splitserve.shared.sampling_params import SamplingParams  # noqa: E402


@torch.inference_mode()
def phase_times(engine, steps: int) -> dict[str, float]:
    """Median ms of each phase over `steps` decode steps (synchronizing between phases)."""
    times: dict[str, list[float]] = {k: [] for k in ("schedule", "prepare", "forward", "logits+sample", "update", "step")}
    runner = engine.runner
    for _ in range(steps):
        t0 = time.perf_counter()
        sched = engine.scheduler.schedule()
        t1 = time.perf_counter()
        tables = engine.kv.block_table_arrays([s.request.request_id for s in sched.scheduled])
        inputs = runner.prepare_inputs(sched, tables)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        hidden = runner._forward(inputs)
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        logits = runner.model.compute_logits(hidden[inputs.sample_indices])
        from splitserve.shared.sampler import SamplingInput

        rows = [SamplingInput(s.request.sampling_params, s.request.prompt_token_ids, s.request.output_token_ids, None)
                for s in sched.scheduled]
        out = runner.sampler(logits, rows)
        t4 = time.perf_counter()
        from splitserve.shared.runner import ModelRunnerOutput

        engine._update(sched, ModelRunnerOutput(out), {})
        t5 = time.perf_counter()
        for key, value in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t5 - t0)):
            times[key].append(value * 1e3)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def async_decode_profile(engine, steps: int) -> None:
    """Decode steps with async scheduling: wall time per step, then the host's hot spots (cProfile)."""
    import cProfile
    import pstats

    engine.async_scheduling = True
    print(f"async decode: {wall_ms_per_step(engine, steps):.2f} ms/step")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        engine.step()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    if engine._inflight is not None:
        engine._resolve({})
    engine.async_scheduling = False


def top_kernels(fn, label: str, n: int = 12, warm: bool = True) -> None:
    from torch.profiler import ProfilerActivity, profile

    if warm:
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    print(f"\n== top CUDA kernels: {label}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=n, max_name_column_width=60))


def main() -> int:
    parser = argparse.ArgumentParser()
    add_shape_arg(parser, "llama-3.2-1b")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--context", type=int, default=512)
    args = parser.parse_args()
    model_dir = write_shape(args.shape, tempfile.mkdtemp())
    llm = LLM(model_dir, load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True, max_num_seqs=args.batch,
              max_num_batched_tokens=16384, enable_prefix_caching=False, gpu_memory_utilization=0.85,
              async_scheduling=False)  # the phase timings below step the engine by hand, synchronously
    engine = llm.engine
    rng = random.Random(0)
    vocab = SHAPES[args.shape]["vocab_size"]
    params = SamplingParams(temperature=0.0, max_tokens=10_000, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(f"r{i}", [rng.randrange(1000, vocab) for _ in range(args.context)], params)
    prefill_s = []
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.requests.values()):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        prefill_s.append(time.perf_counter() - t0)
    print(f"prefill (cold): {len(prefill_s)} steps, ms each: {[round(t * 1e3, 1) for t in prefill_s]}")
    for _ in range(3):
        engine.step()
    print(f"decode phases (median ms, batch {args.batch}):", {k: round(v, 2) for k, v in phase_times(engine, 10).items()})
    async_decode_profile(engine, 20)
    top_kernels(engine.step, f"decode step, batch {args.batch}")
    runner = engine.runner
    graphs, runner.graphs = runner.graphs, None
    top_kernels(engine.step, f"decode step eager, batch {args.batch}")
    runner.graphs = graphs
    # Warm prefill steps: cProfile one to see the host-side cost.
    import cProfile
    import pstats

    for i in range(32):
        engine.add_request(f"w{i}", [rng.randrange(1000, vocab) for _ in range(512)], params)
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    prof.enable()
    engine.step()
    torch.cuda.synchronize()
    prof.disable()
    print(f"\nwarm prefill step (32 x 512 + decodes): {(time.perf_counter() - t0) * 1e3:.1f} ms; host hot spots:")
    pstats.Stats(prof).sort_stats("tottime").print_stats(8)
    # A prefill step: new requests' prompts.
    for i in range(32):
        engine.add_request(f"p{i}", [rng.randrange(1000, vocab) for _ in range(512)], params)
    for r in list(engine.requests):
        if r.startswith("r"):
            engine.abort_request(r)
    top_kernels(engine.step, "prefill step, 32 x 512 tokens", warm=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
