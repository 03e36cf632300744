"""What a step's structured-output bitmask costs on the host: per-row fill and accept, and thread scaling.

    python loadtests/bench_bitmask_fill.py --vocab-size 128256 --rows 256 --threads 1,2,4,8,16

CPU only (no model): the tokenizer of bench_structured.py (a byte-level vocabulary of the given
size, as large and varied as a real one) and its JSON schema, `--rows` matchers walked to different
states under their own masks (inside keys, strings, between items). For each thread count it times
one batched fill of all rows (BitmaskFiller.build, best of `--repeats`) and says µs per row and the
speed-up over one thread; the masks must be identical for every thread count. It also times the
matchers' accept (which the step loop runs itself, before the fill starts) and the hand-off of a
fill to the worker thread (what the step loop waits for before it goes on). Read with the GPU run
of bench_structured.py: the fill must fit beside the step loop's own work on a decode step.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_structured import schema, write_tokenizer  # noqa: E402


def build_grammars(vocab_size: int, rows: int, output_len: int, seed: int = 0) -> tuple[list, list[float]]:
    """`rows` matchers of the schema, row i walked i % 17 tokens under its mask; and the accept times (s)."""
    import torch

    from splitserve.shared.grammar import GrammarCompiler, RequestGrammar, apply_bitmask
    from splitserve.shared.grammar_fill import BitmaskFiller
    from splitserve.shared.structured_outputs import StructuredOutputsParams

    model_dir = tempfile.mkdtemp(prefix="bitmask-fill-")
    write_tokenizer(model_dir, vocab_size - min(256, vocab_size // 16))
    compiler = GrammarCompiler(model_dir, vocab_size)
    compiled = compiler.submit(StructuredOutputsParams(json=schema(output_len))).result(timeout=600)
    compiler.close()
    generator = torch.Generator().manual_seed(seed)
    filler, grammars, accept_s = BitmaskFiller(vocab_size, torch.device("cpu"), 1), [], []
    for i in range(rows):
        grammar = RequestGrammar(compiled, [1])
        for _ in range(i % 17):
            logits = torch.randn(1, vocab_size, generator=generator)
            apply_bitmask(logits, *filler.build([grammar]))
            start = time.perf_counter()
            assert grammar.accept(int(logits.argmax()))
            accept_s.append(time.perf_counter() - start)
        grammars.append(grammar)
    return grammars, accept_s


def time_fill(grammars: list, vocab_size: int, num_threads: int, repeats: int):
    """(best seconds of one batched fill of every row, the mask, median seconds of a hand-off)."""
    import torch

    from splitserve.shared.grammar_fill import BitmaskFiller

    filler, best, handoffs = BitmaskFiller(vocab_size, torch.device("cpu"), num_threads), float("inf"), []
    for _ in range(repeats):
        start = time.perf_counter()
        bitmask, _ = filler.build(grammars)
        best = min(best, time.perf_counter() - start)
        start = time.perf_counter()
        fill = filler.start([], grammars)
        handoffs.append(time.perf_counter() - start)
        fill.result()
    filler.close()
    return best, bitmask.clone(), sorted(handoffs)[len(handoffs) // 2]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab-size", type=int, default=128256)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--threads", default="1,2,4,8,16", help="comma-separated thread counts")
    parser.add_argument("--output-len", type=int, default=128, help="the schema's minItems (bench_structured.py)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--result-json", default=None)
    args = parser.parse_args(argv)
    random.seed(0)
    grammars, accept_s = build_grammars(args.vocab_size, args.rows, args.output_len)
    accept_us = sorted(accept_s)[len(accept_s) // 2] * 1e6 if accept_s else 0.0
    rows, reference = [], None
    for num_threads in [int(t) for t in args.threads.split(",")]:
        seconds, bitmask, handoff_s = time_fill(grammars, args.vocab_size, num_threads, args.repeats)
        if reference is None:
            reference = bitmask
        assert bitmask.equal(reference), f"{num_threads} threads filled a different mask than {rows[0]['threads']}"
        rows.append({"threads": num_threads, "fill_ms": seconds * 1e3, "us_per_row": seconds / args.rows * 1e6,
                     "speedup": rows[0]["fill_ms"] / (seconds * 1e3) if rows else 1.0, "handoff_us": handoff_s * 1e6})
    print(f"\nvocabulary {args.vocab_size}, {args.rows} rows, {os.cpu_count()} cores; accept: median "
          f"{accept_us:.2f} µs a token (the step loop's own work, before the fill)")
    print(f"{'threads':>7s} {'fill ms':>9s} {'µs/row':>8s} {'speed-up':>9s} {'hand-off µs':>12s}")
    for r in rows:
        print(f"{r['threads']:7d} {r['fill_ms']:9.3f} {r['us_per_row']:8.2f} {r['speedup']:8.2f}x {r['handoff_us']:12.1f}")
    result = {"args": vars(args), "accept_us": accept_us, "rows": rows}
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
