"""How a step's grammar bitmask fill scales with threads, by the way the rows are spread.

    python loadtests/bench_fill_scaling.py --vocab-size 128256 --rows 256 --threads 1,2,4,8,16

CPU only (no model, no step loop): bench_structured.py's tokenizer and JSON schema, `--rows`
matchers advanced `--advance` tokens drawn under the mask from seeded noise (so the rows sit in
varied states), then each way of filling the same rows timed (median of `--repeats`; a fill does
not move a matcher, so every repeat fills the same states):

    pool         xgrammar's BatchGrammarMatcher(threads).batch_fill_next_token_bitmask over all rows
    slices       `threads` Python threads, each with a BatchGrammarMatcher(1) of its own, each
                 filling a contiguous slice of the rows (the GIL is released inside each call)
    per-row      one GrammarMatcher.fill_next_token_bitmask call a row, on this thread

`pool, fresh states` times the pool's fill once a decode step instead, each step moving every
row a token (what the engine sees), and the batched accept of one token a row (`accept`, sequential inside xgrammar). Every way must
give the same bitmask. Read with bench_bitmask_fill.py: if `slices` scales where `pool` does not,
the engine's fill should spread the rows itself.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_bitmask_fill import compile_schema  # noqa: E402


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def advanced_matchers(compiled, vocab_size: int, rows: int, advance: int):
    """`rows` matchers moved `advance` tokens each (drawn under their masks); the accept's median ms."""
    import torch
    import xgrammar as xgr

    from splitserve.shared.grammar import bitmask_width

    generator = torch.Generator().manual_seed(0)
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(rows)]
    bitmask = torch.empty(rows, bitmask_width(vocab_size), dtype=torch.int32)
    batch, accepts = xgr.BatchGrammarMatcher(1), []
    for _ in range(advance):
        batch.batch_fill_next_token_bitmask(matchers, bitmask)
        logits = torch.randn(rows, vocab_size, generator=generator)
        xgr.apply_token_bitmask_inplace(logits, bitmask)
        tokens = logits.argmax(dim=-1).tolist()
        start = time.perf_counter()
        assert all(xgr.BatchGrammarMatcher.batch_accept_token(matchers, tokens))
        accepts.append(time.perf_counter() - start)
    return matchers, sorted(accepts)[len(accepts) // 2] * 1e3


def stepped_pool_ms(compiled, vocab_size: int, rows: int, steps: int, num_threads: int) -> float:
    """The pool's fill timed on fresh states: each of `steps` decode steps moves every row one token."""
    import torch
    import xgrammar as xgr

    from splitserve.shared.grammar import bitmask_width

    generator = torch.Generator().manual_seed(1)
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(rows)]
    bitmask = torch.empty(rows, bitmask_width(vocab_size), dtype=torch.int32)
    pool, times = xgr.BatchGrammarMatcher(num_threads), []
    for _ in range(steps):
        start = time.perf_counter()
        pool.batch_fill_next_token_bitmask(matchers, bitmask)
        times.append(time.perf_counter() - start)
        logits = torch.randn(rows, vocab_size, generator=generator)
        xgr.apply_token_bitmask_inplace(logits, bitmask)
        assert all(xgr.BatchGrammarMatcher.batch_accept_token(matchers, logits.argmax(dim=-1).tolist()))
    return sorted(times[2:])[len(times[2:]) // 2] * 1e3


def fill_ways(matchers, width: int, num_threads: int):
    """name -> (fill function, the bitmask it writes)."""
    import torch
    import xgrammar as xgr

    rows = len(matchers)
    pool = xgr.BatchGrammarMatcher(num_threads)
    pool_mask = torch.zeros(rows, width, dtype=torch.int32)
    slice_mask = torch.zeros(rows, width, dtype=torch.int32)
    bounds = [(rows * i // num_threads, rows * (i + 1) // num_threads) for i in range(num_threads)]
    own = [xgr.BatchGrammarMatcher(1) for _ in bounds]
    executor = ThreadPoolExecutor(num_threads)

    def fill_slice(i: int) -> None:
        lo, hi = bounds[i]
        own[i].batch_fill_next_token_bitmask(matchers[lo:hi], slice_mask, list(range(lo, hi)))

    def slices() -> None:
        for future in [executor.submit(fill_slice, i) for i in range(num_threads)]:
            future.result()

    ways = {"pool": (lambda: pool.batch_fill_next_token_bitmask(matchers, pool_mask), pool_mask),
            "slices": (slices, slice_mask)}
    return ways, executor


def per_row(matchers, width: int):
    import torch

    mask = torch.zeros(len(matchers), width, dtype=torch.int32)

    def fill() -> None:
        for i, matcher in enumerate(matchers):
            matcher.fill_next_token_bitmask(mask, i)
    return fill, mask


def main(argv: list[str] | None = None) -> dict:
    import torch

    from splitserve.shared.grammar import bitmask_width

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab-size", type=int, default=128256)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--threads", default="1,2,4,8,16")
    parser.add_argument("--output-len", type=int, default=128, help="the schema's minItems (bench_structured.py)")
    parser.add_argument("--advance", type=int, default=12, help="tokens each matcher takes before the timing")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    compiled = compile_schema(args.vocab_size, args.output_len)
    matchers, accept_ms = advanced_matchers(compiled, args.vocab_size, args.rows, args.advance)
    width = bitmask_width(args.vocab_size)
    fill, reference = per_row(matchers, width)
    result = {"args": vars(args), "accept_ms": accept_ms, "per_row_ms": _median_ms(fill, args.repeats), "rows": []}
    for num_threads in [int(t) for t in args.threads.split(",")]:
        ways, executor = fill_ways(matchers, width, num_threads)
        row = {"threads": num_threads}
        for name, (fn, mask) in ways.items():
            row[f"{name}_ms"] = _median_ms(fn, args.repeats)
            assert torch.equal(mask, reference), f"{name} at {num_threads} threads wrote another bitmask"
        executor.shutdown()
        row["stepped_ms"] = stepped_pool_ms(compiled, args.vocab_size, args.rows, args.advance, num_threads)
        result["rows"].append(row)
    _print(args, result)
    return result


def _print(args, result: dict) -> None:
    print(f"\nvocabulary {args.vocab_size}, {args.rows} rows advanced {args.advance} tokens, {os.cpu_count()} cores; "
          f"medians of {args.repeats}")
    print(f"batched accept {result['accept_ms']:.3f} ms; per-row fill on one thread {result['per_row_ms']:.3f} ms")
    print(f"{'threads':>7s} {'pool ms':>9s} {'slices ms':>10s} {'pool, fresh states ms':>22s}")
    for r in result["rows"]:
        print(f"{r['threads']:7d} {r['pool_ms']:9.3f} {r['slices_ms']:10.3f} {r['stepped_ms']:22.3f}")


if __name__ == "__main__":
    main()
