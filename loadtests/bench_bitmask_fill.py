"""What a step's structured-output bitmask costs the step loop on the host, per fill thread count.

    python loadtests/bench_bitmask_fill.py --vocab-size 128256 --rows 256 --threads 1,4,8,16 --booking-ms 1.5

CPU only (no model): the tokenizer of bench_structured.py (a byte-level vocabulary of the given
size, as large and varied as a real one) and its JSON schema; `--rows` matchers run `--steps`
decode steps the way the async engine runs them (BitmaskFiller.start hands the pool's threads
the last step's tokens to accept and this step's rows to fill, a slice each; the step loop runs half of
`--booking-ms` of Python, waits for the accepts, runs the other half, waits for the fill), tokens
drawn under the mask from seeded noise, so the states vary and every thread count must draw the
same tokens; each step's mask must equal the inline fill's. Medians over the steps:

    hand-off      start: planning the slices and the handshake with the pool's threads
    accept wait   wait_accepted, after the first half of the booking
    fill wait     result, after the second half (0 when the fill hid behind the booking)
    loop cost     their sum: what the step loop spends on the mask besides booking
    inline        accept + fill of all rows on one thread, one xgrammar call each (no pool)

and, once, a thread's start-up delay with and without the handshake while the step
loop runs Python (a thread woken then waits for the GIL up to the switch interval). Read with
the GPU run of bench_structured.py: the loop cost must fit beside the decode step's forward.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_structured import schema, write_tokenizer  # noqa: E402
from results import add_result_json_arg, write_result_json  # noqa: E402


def compile_schema(vocab_size: int, output_len: int):
    from splitserve.shared.grammar import GrammarCompiler
    from splitserve.shared.structured_outputs import StructuredOutputsParams

    model_dir = tempfile.mkdtemp(prefix="bitmask-fill-")
    write_tokenizer(model_dir, vocab_size - min(256, vocab_size // 16))
    compiler = GrammarCompiler(model_dir, vocab_size)
    compiled = compiler.submit(StructuredOutputsParams(json=schema(output_len))).result(timeout=600)
    compiler.close()
    return compiled


def run_python(seconds: float) -> None:
    """Python bytecode for `seconds`, holding the GIL as the step loop's booking does."""
    deadline, count = time.perf_counter() + seconds, 0
    while time.perf_counter() < deadline:
        count += 1


class _Marks:
    """With --trace: when each pool thread began and ended its slice's accept and fill in each step
    (the pool's two calls wrapped; their Python is the trace's only addition to the threads)."""

    def __init__(self) -> None:
        import splitserve.shared.grammar_fill as fill

        self.fill, self.slices = fill, {}
        self._accept, self._fill = fill.accept_slice, fill.fill_slice
        marks = self

        def accept(part):
            begin = time.perf_counter()
            marks._accept(part)
            marks.slices.setdefault(id(part), {})["accept"] = (begin, time.perf_counter())

        def fill_rows(part, call):
            begin = time.perf_counter()
            marks._fill(part, call)
            marks.slices.setdefault(id(part), {})["fill"] = (begin, time.perf_counter())
        fill.accept_slice, fill.fill_slice = accept, fill_rows

    def step_times(self) -> dict[str, float]:
        """The step's marks over its slices: the last thread to start, the longest calls."""
        parts, self.slices = list(self.slices.values()), {}
        return {"accept_begin": max(p["accept"][0] for p in parts),
                "accept_ms_max": max(p["accept"][1] - p["accept"][0] for p in parts),
                "fill_gap_max": max(p["fill"][0] - p["accept"][1] for p in parts),
                "fill_ms_max": max(p["fill"][1] - p["fill"][0] for p in parts),
                "fill_end": max(p["fill"][1] for p in parts)}

    def close(self) -> None:
        self.fill.accept_slice, self.fill.fill_slice = self._accept, self._fill


TRACE_SPANS = ("wake", "resume", "accept", "accept_to_fill", "fill", "after_fill")
"""--trace, a step's spans: wake (start until the last pool thread runs its accept), resume (from
there until start returns), accept (the longest slice's accept), accept_to_fill (the longest wait
of a thread between its two calls: its GIL hand-off), fill (the longest slice's fill), after_fill
(the last fill's end until result returns)."""


def _trace_spans(marks: _Marks, start: float, handed: float, end: float) -> dict[str, float]:
    at = marks.step_times()
    return {"wake": at["accept_begin"] - start, "resume": handed - at["accept_begin"],
            "accept": at["accept_ms_max"], "accept_to_fill": at["fill_gap_max"], "fill": at["fill_ms_max"],
            "after_fill": end - at["fill_end"]}


def reference_step(twins, new_tokens, width: int):
    """Accept and fill on this thread, one xgrammar call each, no pool: the reference mask (and
    the `inline` column: what one thread would do)."""
    import torch
    import xgrammar as xgr

    from splitserve.shared.grammar_fill import accept_tokens, live_rows

    accept_tokens([(twin, token) for twin, (_, token) in zip(twins, new_tokens)])
    rows = live_rows(twins)
    bitmask = torch.zeros(len(twins), width, dtype=torch.int32)
    xgr.BatchGrammarMatcher(1).batch_fill_next_token_bitmask([twins[i].matcher for i in rows], bitmask, rows)
    return bitmask, rows


def run_steps(compiled, vocab_size: int, rows: int, num_threads: int, steps: int, warm: int,
              booking_s: float, trace: bool = False) -> dict:
    """`steps` decode steps of `rows` fresh matchers, as the async engine runs them; times the
    steps after `warm` (medians) and returns the tokens drawn."""
    import torch

    from splitserve.shared.grammar import RequestGrammar, apply_bitmask
    from splitserve.shared.grammar_fill import BitmaskFiller

    generator = torch.Generator().manual_seed(0)
    filler = BitmaskFiller(vocab_size, torch.device("cpu"), num_threads)
    grammars = [RequestGrammar(compiled, [1]) for _ in range(rows)]
    twins = [RequestGrammar(compiled, [1]) for _ in range(rows)]  # the same tokens, filled inline
    new_tokens, drawn, times = [], [], {k: [] for k in ("handoff", "accept_wait", "fill_wait", "inline")}
    marks = _Marks() if trace else None
    if trace:
        times.update({name: [] for name in TRACE_SPANS})
    for step in range(steps):
        start = time.perf_counter()
        fill = filler.start(new_tokens, grammars)
        handed = time.perf_counter()
        run_python(booking_s / 2)  # what of the last step needs no grammar
        booked = time.perf_counter()
        assert all(fill.wait_accepted())
        accepted = time.perf_counter()
        run_python(booking_s / 2)  # the grammar rows' outputs
        booked_all = time.perf_counter()
        bitmask, indices = (t.clone() for t in fill.result())
        end = time.perf_counter()
        inline_start = time.perf_counter()
        inline, inline_rows = reference_step(twins, new_tokens, filler.width)
        inline_end = time.perf_counter()
        assert indices.tolist() == inline_rows and torch.equal(inline[inline_rows], bitmask[inline_rows])
        if step >= warm:
            for key, seconds in (("handoff", handed - start), ("accept_wait", accepted - booked),
                                 ("fill_wait", end - booked_all), ("inline", inline_end - inline_start)):
                times[key].append(seconds)
            if marks is not None:
                for name, seconds in _trace_spans(marks, start, handed, end).items():
                    times[name].append(seconds)
        if marks is not None:
            marks.slices = {}
        logits = torch.randn(rows, vocab_size, generator=generator)
        apply_bitmask(logits, bitmask, indices)
        tokens = logits.argmax(dim=-1).tolist()
        drawn.append(tokens)
        new_tokens = list(zip(grammars, tokens))
    filler.close()
    if marks is not None:
        marks.close()
    row = {key: _median(values) * 1e3 for key, values in times.items()}
    row["loop_cost"] = row["handoff"] + row["accept_wait"] + row["fill_wait"]
    return {"threads": num_threads, **{f"{k}_ms": v for k, v in row.items()}, "tokens": drawn}


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def thread_start_delay(busy_s: float, handshake: bool, repeats: int = 9) -> float:
    """Median delay (ms) from waking a thread to it running, while this thread runs Python for
    `busy_s` right after (with `handshake`: waiting first until the thread says it runs)."""
    delays = []
    for _ in range(repeats):
        go, running, began = threading.Event(), threading.Event(), []

        def worker() -> None:
            go.wait()
            began.append(time.perf_counter())
            running.set()

        thread = threading.Thread(target=worker)
        thread.start()
        time.sleep(0.005)  # the worker is asleep in go.wait()
        woken = time.perf_counter()
        go.set()
        if handshake:
            running.wait(5)
        run_python(busy_s)
        thread.join()
        delays.append(began[0] - woken)
    return _median(delays) * 1e3


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab-size", type=int, default=128256)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--threads", default="1,2,4,8,16", help="comma-separated thread counts of the fill")
    parser.add_argument("--output-len", type=int, default=128, help="the schema's minItems (bench_structured.py)")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warm", type=int, default=4, help="steps not timed (states still alike)")
    parser.add_argument("--booking-ms", type=float, default=1.5, help="Python on the step loop between start and result")
    parser.add_argument("--trace", action="store_true",
                        help="also time each hand-off and call of the pool's threads (TRACE_SPANS)")
    add_result_json_arg(parser)
    args = parser.parse_args(argv)
    compiled = compile_schema(args.vocab_size, args.output_len)
    rows = []
    for num_threads in [int(t) for t in args.threads.split(",")]:
        row = run_steps(compiled, args.vocab_size, args.rows, num_threads, args.steps, args.warm, args.booking_ms / 1e3,
                        args.trace)
        assert not rows or row["tokens"] == rows[0]["tokens"], f"{num_threads} threads drew other tokens"
        rows.append(row)
    for row in rows:
        row.pop("tokens")
    delays = {"plain_ms": thread_start_delay(0.02, False), "handshake_ms": thread_start_delay(0.02, True),
              "switch_interval_ms": sys.getswitchinterval() * 1e3}
    _print(args, rows, delays)
    result = {"args": vars(args), "rows": rows, "thread_start_delay": delays}
    write_result_json(args.result_json, result)
    return result


def _print(args, rows: list[dict], delays: dict) -> None:
    print(f"\nvocabulary {args.vocab_size}, {args.rows} rows, {os.cpu_count()} cores, medians of "
          f"{args.steps - args.warm} steps, {args.booking_ms} ms of booking on the step loop")
    print(f"{'threads':>7s} {'hand-off ms':>12s} {'accept wait ms':>15s} {'fill wait ms':>13s} {'loop cost ms':>13s} "
          f"{'inline ms':>10s}")
    for r in rows:
        print(f"{r['threads']:7d} {r['handoff_ms']:12.3f} {r['accept_wait_ms']:15.3f} {r['fill_wait_ms']:13.3f} "
              f"{r['loop_cost_ms']:13.3f} {r['inline_ms']:10.3f}")
    if args.trace:
        print("pool threads, ms: " + "; ".join(
            f"{r['threads']} threads " + ", ".join(f"{name} {r[name + '_ms']:.3f}" for name in TRACE_SPANS)
            for r in rows))
    print(f"a woken thread starts {delays['plain_ms']:.3f} ms late while the step loop runs Python "
          f"(switch interval {delays['switch_interval_ms']:.1f} ms), {delays['handshake_ms']:.3f} ms with the handshake")


if __name__ == "__main__":
    main()
