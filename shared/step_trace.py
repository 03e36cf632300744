"""`--step-trace PATH`: one CSV line per engine step, to see where a served run's time goes.

    start_s,step_ms,requests,tokens,outputs

`start_s` is `time.perf_counter()` when the step began, so the gap between one step's end and the
next step's start is the time the loop spent outside the engine (draining commands, sending
outputs, idling). The same trace from the offline engine and from the engine process of a served
run, on the same workload, says whether the served engine steps slower, steps smaller batches, or
waits between steps (`loadtests/step_trace_summary.py` compares them).
"""

from __future__ import annotations

import os
import time

HEADER = "start_s,step_ms,requests,tokens,outputs\n"


class StepTrace:
    """Appends one line per step; buffered, flushed when closed (a killed process loses the tail)."""

    def __init__(self, path: str) -> None:
        # "{pid}" in the path: every engine of a stack (prefill, decode) writes a file of its own
        self.file = open(path.replace("{pid}", str(os.getpid())), "w", buffering=1 << 20)  # noqa: SIM115 - closed by close()
        self.file.write(HEADER)
        self.start = 0.0

    def begin(self) -> None:
        self.start = time.perf_counter()

    def end(self, num_requests: int, num_tokens: int, num_outputs: int) -> None:
        step_ms = (time.perf_counter() - self.start) * 1e3
        self.file.write(f"{self.start:.6f},{step_ms:.3f},{num_requests},{num_tokens},{num_outputs}\n")

    def close(self) -> None:
        self.file.close()
