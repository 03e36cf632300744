"""What sets the structured step's run-to-run spread? One engine, the workload of bench_structured.py,
json-schema runs in variants alternating with unconstrained ones, three rounds; each run's loss
against the unconstrained run of its round.

    python loadtests/structured_spread_probe.py --probe switch   # GIL switch interval x the pool's start handshake
    python loadtests/structured_spread_probe.py --probe gc       # garbage collections timed; the collector off

`switch` sets `sys.setswitchinterval` and, for "no handshake", lets `BitmaskFiller.start` return
before every pool thread has taken its slice (an experiment: the shipped code keeps it). `gc` times
every collection through `gc.callbacks`. docs/benchmarks.md section 22 has the H200 results.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_structured  # noqa: E402
from bench_offline import _time_steps  # noqa: E402
from workload import add_shape_arg, add_workload_args, random_prompts  # noqa: E402

SWITCH_VARIANTS = [("plain 5ms", False, True, 0.005), ("json hs 5ms", True, True, 0.005),
                   ("json nohs 0.2ms", True, False, 0.0002), ("json hs 0.2ms", True, True, 0.0002),
                   ("json nohs 1ms", True, False, 0.001), ("plain 0.2ms", False, True, 0.0002)]
GC_VARIANTS = [("plain", False, True), ("json", True, True), ("json gc off", True, False),
               ("plain gc off", False, False)]


class GcTimer:
    """Counts and times collections per generation while installed."""

    def __init__(self) -> None:
        self.counts, self.seconds, self.longest, self._start = [0, 0, 0], [0.0, 0.0, 0.0], 0.0, 0.0
        gc.callbacks.append(self._on_gc)

    def close(self) -> None:
        gc.callbacks.remove(self._on_gc)

    def reset(self) -> None:
        self.counts, self.seconds, self.longest = [0, 0, 0], [0.0, 0.0, 0.0], 0.0

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        took, generation = time.perf_counter() - self._start, info["generation"]
        self.counts[generation] += 1
        self.seconds[generation] += took
        self.longest = max(self.longest, took)

    def line(self) -> str:
        return (f"gc runs {self.counts} seconds {[round(s, 3) for s in self.seconds]} "
                f"longest {self.longest * 1e3:.1f} ms")


def switch_variant(structured_run, handshake: bool, interval_s: float):
    from splitserve.shared import grammar_fill

    wait, interval = grammar_fill._wait, sys.getswitchinterval()
    sys.setswitchinterval(interval_s)
    if not handshake:
        grammar_fill._wait = lambda event, what: None if what == "take its slice" else wait(event, what)
    try:
        return structured_run()
    finally:
        grammar_fill._wait = wait
        sys.setswitchinterval(interval)


def gc_variant(structured_run, collector_on: bool):
    if not collector_on:
        gc.disable()
    try:
        return structured_run()
    finally:
        gc.enable()


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probe", choices=("switch", "gc"), required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    add_shape_arg(parser, "llama-3.2-1b", extra=("tiny",))
    add_workload_args(parser, num_prompts=256, input_len=512, output_len=128)
    args = parser.parse_args(argv)

    from splitserve.shared.llm import LLM

    model_dir, vocab_size = bench_structured.write_model(args.shape, tempfile.mkdtemp(prefix="spread-"))
    prompts = random_prompts(args.num_prompts, args.input_len, vocab_size, low=300)
    llm = LLM(model_dir, load_format="dummy", device=args.device, skip_tokenizer_init=True,
              max_num_batched_tokens=16384, gpu_memory_utilization=0.85, enable_prefix_caching=False)
    steps = _time_steps(llm.engine)
    variants = SWITCH_VARIANTS if args.probe == "switch" else GC_VARIANTS
    timer = GcTimer()
    try:
        results = run_rounds(llm, steps, prompts, args, variants, timer)
    finally:
        timer.close()
    report(results, variants)
    return results


def run_rounds(llm, steps: list, prompts: list[list[int]], args: argparse.Namespace, variants: list,
               timer: GcTimer) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {v[0]: [] for v in variants}
    for rnd in range(args.rounds):
        for name, structured, *settings in variants:
            def run(structured=structured):
                return bench_structured.run(llm, steps, prompts, args.output_len, structured)
            timer.reset()
            row = switch_variant(run, *settings) if args.probe == "switch" else gc_variant(run, *settings)
            results[name].append(row)
            print(f"round {rnd} {name:16s} {row['output_tok_s']:8.0f} tok/s  median decode step "
                  f"{row['median_decode_step_ms']:.2f} ms  {timer.line()}", flush=True)
    return results


def report(results: dict[str, list[dict]], variants: list) -> None:
    baseline = results[variants[0][0]]
    print("\nloss against the round's unconstrained run")
    for name, rows in results.items():
        losses = " ".join(f"{100 * (1 - r['output_tok_s'] / b['output_tok_s']):5.1f}%" for r, b in zip(rows, baseline))
        print(f"{name:16s} {losses}")


if __name__ == "__main__":
    main()
