"""Find the slow steps of an offline run, with what was happening in each: batch, new tokens, Python
garbage collections, CUDA allocator calls (cudaMalloc/cudaFree, allocation retries), and CUDA graph
misses. Prints the slowest steps of every pass and a cProfile of the host side.

    python loadtests/stall_probe.py --shape llama-3.2-1b --num-prompts 256 --input-len 512 --output-len 128
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import pstats
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from shapes import SHAPES, write_shape  # noqa: E402
from workload import add_shape_arg, add_workload_args, random_prompts  # noqa: E402


class StepTrace:
    """Wraps `engine.step` and records one row per step."""

    def __init__(self, engine) -> None:
        import torch

        self.torch = torch
        self.engine = engine
        self.rows: list[dict] = []
        self.gc_s = 0.0
        self.gc_count = 0
        self._gc_t0 = 0.0
        gc.callbacks.append(self._on_gc)
        self._step, self._schedule = engine.step, engine.scheduler.schedule
        engine.step, engine.scheduler.schedule = self.step, self.schedule
        self._last = (0, 0)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        else:
            self.gc_s += time.perf_counter() - self._gc_t0
            self.gc_count += 1 if info.get("generation") == 2 else 0

    def schedule(self):
        out = self._schedule()
        self._last = (len(out.scheduled), out.num_batched_tokens)
        return out

    def _alloc_stats(self) -> tuple[int, int, int]:
        s = self.torch.cuda.memory_stats()
        return (s.get("num_device_alloc", 0), s.get("num_device_free", 0), s.get("num_alloc_retries", 0))

    def step(self):
        gc_s, gc2, alloc = self.gc_s, self.gc_count, self._alloc_stats()
        t0 = time.perf_counter()
        result = self._step()
        dt = time.perf_counter() - t0
        a1 = self._alloc_stats()
        self.rows.append({"i": len(self.rows), "reqs": self._last[0], "tokens": self._last[1], "ms": dt * 1e3,
                          "gc_ms": (self.gc_s - gc_s) * 1e3, "gc2": self.gc_count - gc2,
                          "mallocs": a1[0] - alloc[0], "frees": a1[1] - alloc[1], "retries": a1[2] - alloc[2]})
        return result

    def report(self, label: str, top: int = 8) -> None:
        rows = self.rows
        decode = sorted(r["ms"] for r in rows if r["tokens"] == r["reqs"] and r["reqs"])
        print(f"-- {label}: {len(rows)} steps, total {sum(r['ms'] for r in rows):.1f} ms, decode median "
              f"{decode[len(decode) // 2] if decode else 0:.2f} ms, gc {sum(r['gc_ms'] for r in rows):.1f} ms "
              f"({sum(r['gc2'] for r in rows)} full), mallocs {sum(r['mallocs'] for r in rows)}, "
              f"frees {sum(r['frees'] for r in rows)}, retries {sum(r['retries'] for r in rows)}")
        for r in sorted(rows, key=lambda r: -r["ms"])[:top]:
            print("   step {i:4d} reqs {reqs:4d} tokens {tokens:6d}  {ms:8.2f} ms  gc {gc_ms:6.2f} ms "
                  "(full {gc2})  malloc {mallocs} free {frees} retries {retries}".format(**r))
        self.rows = []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arg(parser, "llama-3.2-1b")
    add_workload_args(parser, num_prompts=256, input_len=512, output_len=128)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--gc-freeze", action="store_true", help="gc.freeze() after start-up (an A/B)")
    args = parser.parse_args()

    import torch

    from splitserve.shared.llm import LLM
    from splitserve.shared.sampling_params import SamplingParams

    model_dir = write_shape(args.shape, tempfile.mkdtemp(prefix=f"shape-{args.shape}-"))
    prompts = [{"prompt_token_ids": p}
               for p in random_prompts(args.num_prompts, args.input_len, SHAPES[args.shape]["vocab_size"])]
    llm = LLM(model_dir, load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True, max_num_seqs=256,
              max_num_batched_tokens=16384, gpu_memory_utilization=0.85, enable_prefix_caching=False)
    if args.gc_freeze:
        gc.collect()
        gc.freeze()
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    trace = StepTrace(llm.engine)
    for p in range(args.passes):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        profile = cProfile.Profile() if p == args.passes - 1 else None
        if profile:
            profile.enable()
        llm.generate(prompts, params)
        if profile:
            profile.disable()
        torch.cuda.synchronize()
        trace.report(f"pass {p} ({time.perf_counter() - t0:.3f} s wall{', profiled' if profile else ''})")
    buf = io.StringIO()
    pstats.Stats(profile, stream=buf).sort_stats("tottime").print_stats(25)
    print(buf.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
