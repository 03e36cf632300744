"""Where an engine step's time goes: host wall time per phase of `EngineCore._step`, and on CUDA the
device's time per step split into sampling, forward and idle, for the decode steps of a run.

    probe = PhaseProbe(llm.engine)      # wraps the engine's parts in place (after any other wrapper)
    llm.generate(...)
    print(probe.table())                # median ms per decode step of each phase
    probe.close()                       # restores the class-level wrappers

Host phases are inclusive wall times (`sample_deferred` holds `fill_wait`, `resolve` holds
`tokens_wait` and `accept_wait`); `between` is the time from one step's end to the next one's start
(the caller's loop: `LLM.generate` building its outputs, or the engine process sending them). The
device split uses CUDA events on the compute stream: one before the deferred sampling, one before
the forward is launched and one after, so `device_idle` is the time the stream had nothing of ours
queued between one step's forward and the next step's sampling. For bench_structured.py
(`--phases`); a diagnosis tool, not part of the engine.
"""

from __future__ import annotations

import importlib
import time
from collections import defaultdict
from statistics import median

HOST_PHASES = (("_external", "poll", "poll"), ("scheduler", "schedule", "schedule"),
               ("kv", "block_table_arrays", "tables"), ("runner", "stage_inputs", "stage"),
               ("", "_sample_deferred", "sample_deferred"), ("runner", "execute_async", "launch"),
               ("", "_advance", "advance"), ("", "_resolve", "resolve"),
               ("_external", "save_new_blocks", "save"))
"""(attribute of the engine holding the method, '' for the engine itself; method; phase name)."""
PER_ROW_PHASES = (("_emitter", "emit_sampled", "emit"), ("", "_book_computed", "book"))
"""Called once a request a step (summed over the step), inside `resolve`."""
MODULE_PHASES = (("splitserve.shared.engine", "start_fill", "start_fill"),
                 ("splitserve.shared.engine", "rejected_ids", "rejected"),
                 ("splitserve.shared.grammar_fill", "plan_slices", "plan_slices"),
                 ("splitserve.shared.sampler", "apply_bitmask", "apply_mask"))
"""Functions the step calls by their module's name (wrapped there, restored by close)."""
CLASS_PHASES = (("grammar_fill", "StepFill", "result", "fill_wait"),
                ("grammar_fill", "StepFill", "wait_accepted", "accept_wait"),
                ("runner", "PendingStep", "sampled", "tokens_wait"))
"""(module of splitserve.shared, class, method, phase name): wrapped on the class, restored by close."""
DEVICE_PHASES = ("device_sample", "device_forward", "device_idle")
PHASES = ("step", "between", *(p for *_, p in HOST_PHASES + PER_ROW_PHASES + MODULE_PHASES + CLASS_PHASES),
          *DEVICE_PHASES)
"""Every phase, in the order the table prints them."""


class PhaseProbe:
    def __init__(self, engine) -> None:
        self.engine = engine
        self.steps: list[dict[str, float]] = []
        self._current: dict[str, float] = defaultdict(float)
        self._last_end: float | None = None
        self._events: list[tuple] = []
        self._cuda = engine.runner.device.type == "cuda"
        self._restore: list[tuple[object, str, object]] = []
        for holder, method, name in HOST_PHASES + PER_ROW_PHASES:
            owner = getattr(engine, holder) if holder else engine
            if owner is not None:
                self._wrap(owner, method, name)
        for module, function, name in MODULE_PHASES:
            self._wrap(importlib.import_module(module), function, name, restore=True)
        for module, cls, method, name in CLASS_PHASES:
            owner = getattr(importlib.import_module(f"splitserve.shared.{module}"), cls)
            self._wrap(owner, method, name, restore=True)
        self._wrap_step()

    def _wrap(self, owner, method: str, name: str, restore: bool = False) -> None:
        inner = getattr(owner, method)
        current = self._current
        marks = self._device_marks(name)

        def timed(*args, **kwargs):
            marks()
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                current[name] += time.perf_counter() - t0

        if restore:  # class attributes and module functions outlive this engine
            self._restore.append((owner, method, inner))
        setattr(owner, method, timed)

    def _device_marks(self, name: str):
        """A CUDA event before the deferred sampling and before the launch (see the docstring)."""
        if not self._cuda or name not in ("sample_deferred", "launch"):
            return lambda: None
        import torch

        def mark():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._step_events[name] = event

        return mark

    def _wrap_step(self) -> None:
        engine, inner = self.engine, self.engine.step
        schedule = engine.scheduler.schedule
        shape: list[int] = [0, 0]

        def schedule_noting():
            out = schedule()
            shape[:] = [len(out.scheduled), out.num_batched_tokens]
            return out

        def step():
            self._step_events = {}
            t0 = time.perf_counter()
            if self._last_end is not None:
                self._current["between"] = t0 - self._last_end
            out = inner()
            end = time.perf_counter()
            self._current["step"] = end - t0
            self._last_end = end
            self._finish_step(shape)
            return out

        engine.scheduler.schedule, engine.step = schedule_noting, step

    def _finish_step(self, shape: list[int]) -> None:
        record = dict(self._current)
        record["requests"], record["tokens"] = shape
        self._current.clear()
        self.steps.append(record)
        if self._cuda:
            import torch

            after = torch.cuda.Event(enable_timing=True)
            after.record()
            self._events.append((self._step_events.get("sample_deferred"), self._step_events.get("launch"), after))

    def device_split(self) -> list[dict[str, float]]:
        """Per step (CUDA): sample (deferred sampling), forward (launch to the step's end) and idle
        (the previous step's end to this one's first event) in ms."""
        import torch

        torch.cuda.synchronize()
        rows, previous_end = [], None
        for sample, launch, end in self._events:
            first = sample or launch or end
            row = {"device_idle": previous_end.elapsed_time(first) if previous_end is not None else 0.0}
            row["device_sample"] = sample.elapsed_time(launch) if sample is not None and launch is not None else 0.0
            row["device_forward"] = launch.elapsed_time(end) if launch is not None else 0.0
            rows.append(row)
            previous_end = end
        return rows

    def table(self, decode_only: bool = True) -> str:
        """Median ms of each phase over the (decode) steps."""
        steps = self.steps
        if self._cuda:
            steps = [{**s, **d} for s, d in zip(steps, self.device_split())]
        if decode_only:
            steps = [s for s in steps if s["requests"] and s["tokens"] == s["requests"]]
        if not steps:
            return "(no steps)"
        names = [n for n in PHASES if any(n in s for s in steps)]
        lines = [f"{len(steps)} steps, median batch {median(s['requests'] for s in steps):.0f}"]
        lines += [f"  {n:16s} {median(s.get(n, 0.0) for s in steps) * (1 if n in DEVICE_PHASES else 1e3):8.3f} ms"
                  for n in names]
        return "\n".join(lines)

    def reset(self) -> None:
        """Forget the steps so far (a cold pass)."""
        self.steps.clear()
        self._events.clear()
        self._last_end = None

    def close(self) -> None:
        for owner, method, inner in self._restore:
            setattr(owner, method, inner)
        self._restore.clear()
