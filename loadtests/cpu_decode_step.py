"""The engine alone on CPU, stepped by hand: N requests of 256 random prompt tokens decoding 64,
one torch thread, the demo checkpoint; per round the median and p90 of its decode steps.

    python loadtests/cpu_decode_step.py [N=16] [ROUNDS=3]

Run it from outside the repository (it imports the installed `splitserve`). The A/B of
docs/benchmarks.md section 21 ran it with the change and without it (`git stash`), alternating.
"""

import sys, time, statistics, random
import torch
from splitserve.shared.llm import LLM
from splitserve.shared.sampling_params import SamplingParams
n = int(sys.argv[1]) if len(sys.argv) > 1 else 16
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
llm = LLM(None, device="cpu", cpu_threads=1, enable_prefix_caching=False, skip_tokenizer_init=True)
eng = llm.engine
rng = random.Random(0)
for r in range(rounds):
    for i in range(n):
        eng.add_request(f"{r}-{i}", [rng.randrange(100, 2000) for _ in range(256)],
                        SamplingParams(max_tokens=64, ignore_eos=True, temperature=0.0))
    times = []
    while eng.has_unfinished_requests():
        t = time.perf_counter(); eng.step(); times.append(time.perf_counter() - t)
    dec = sorted(times[3:])
    print(f"round {r}: steps {len(times)} first {times[0]*1e3:.1f} ms median {statistics.median(dec)*1e3:.2f} ms p90 {dec[int(.9*len(dec))]*1e3:.2f}", flush=True)
