"""The engine alone on CPU, stepped by hand: N requests of 256 random prompt tokens decoding 64,
one torch thread, the demo checkpoint; per round the median and p90 of its decode steps.

    python loadtests/cpu_decode_step.py [N=16] [ROUNDS=3] [DTYPE=auto]

Run it from outside the repository (it imports the installed `splitserve`). The A/B of
docs/benchmarks.md section 21 ran it with the change and without it (`git stash`), alternating;
section 23's ran it with PYTHONPATH pointing at an older commit's tree in turn.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from workload import random_prompts  # noqa: E402

PROMPT_LEN, OUTPUT_LEN = 256, 64
PREFILL_STEPS = 3
"""Steps left out of the decode figures: the round's prompts prefill in the first ones."""


def run_round(engine, round_index: int, num_requests: int) -> list[float]:
    """Add the round's requests, step until they finish; each step's wall time in seconds."""
    from splitserve.shared.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=OUTPUT_LEN, ignore_eos=True, temperature=0.0)
    for i, prompt in enumerate(random_prompts(num_requests, PROMPT_LEN, 2000, low=100, seed=round_index)):
        engine.add_request(f"{round_index}-{i}", prompt, params)
    times = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    from splitserve.shared.llm import LLM

    num_requests = int(sys.argv[1]) if len(sys.argv) > 1 else 16
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    dtype = sys.argv[3] if len(sys.argv) > 3 else "auto"
    llm = LLM(None, device="cpu", cpu_threads=1, enable_prefix_caching=False, skip_tokenizer_init=True, dtype=dtype)
    for r in range(rounds):
        times = run_round(llm.engine, r, num_requests)
        decode = sorted(times[PREFILL_STEPS:])
        print(f"round {r}: steps {len(times)} first {times[0] * 1e3:.1f} ms median "
              f"{statistics.median(decode) * 1e3:.2f} ms p90 {decode[int(0.9 * len(decode))] * 1e3:.2f}", flush=True)


if __name__ == "__main__":
    main()
