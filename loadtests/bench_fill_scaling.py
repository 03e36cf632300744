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

On fresh states instead (`fresh_*`: `--advance` decode steps, each moving every row a token,
what the engine sees; medians after two warm steps; every way must draw the same tokens):

    accept         xgrammar's batched accept of one token a row (one sequential C++ call)
    pool           xgrammar's pool fill, as above
    slices         the engine's pool (grammar_fill.BitmaskFiller(threads).build): fill only
    accept_slices  the engine's pool taking the step's tokens: start + wait_accepted (the handshake,
                   the accept slices, the step loop reading the results)
    own_step       the engine's pool, the whole step: start to result (accept, then fill)

Every way must give the same bitmask. Read with bench_bitmask_fill.py, which times the engine's
pool beside a step loop that books Python.
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


def stepped(compiled, vocab_size: int, rows: int, steps: int, step) -> tuple[dict[str, float], list]:
    """Fresh states: `steps` decode steps, each moving every row one token drawn under the mask
    (seeded, so every way draws the same tokens); `step(grammars, new_tokens)` makes the step's
    accept (if it takes `new_tokens`) and fill and returns (bitmask, rows, {name: seconds}).
    Medians in ms after two warm steps, and the tokens drawn."""
    import torch

    from splitserve.shared.grammar import RequestGrammar, apply_bitmask

    generator = torch.Generator().manual_seed(1)
    grammars = [RequestGrammar(compiled, [1]) for _ in range(rows)]
    new_tokens, times, drawn = [], {}, []
    for _ in range(steps):
        bitmask, indices, step_times = step(grammars, new_tokens)
        for name, seconds in step_times.items():
            times.setdefault(name, []).append(seconds)
        logits = torch.randn(rows, vocab_size, generator=generator)
        apply_bitmask(logits, bitmask, indices)
        tokens = logits.argmax(dim=-1).tolist()
        drawn.append(tokens)
        new_tokens = list(zip(grammars, tokens))
    return {name: sorted(v[2:])[len(v[2:]) // 2] * 1e3 for name, v in times.items()}, drawn


def xgrammar_pool_step(num_threads: int, width: int):
    """The batched accept (timed: `accept`), then xgrammar's pool fills all rows (timed: `pool`)."""
    import torch
    import xgrammar as xgr

    pool, mask = xgr.BatchGrammarMatcher(num_threads), None

    def step(grammars, new_tokens):
        nonlocal mask
        mask = torch.zeros(len(grammars), width, dtype=torch.int32) if mask is None else mask
        start = time.perf_counter()
        assert all(xgr.BatchGrammarMatcher.batch_accept_token([g.matcher for g, _ in new_tokens],
                                                              [t for _, t in new_tokens]))
        accepted = time.perf_counter()
        pool.batch_fill_next_token_bitmask([g.matcher for g in grammars], mask)
        return mask, torch.arange(len(grammars), dtype=torch.int32), {"accept": accepted - start,
                                                                       "pool": time.perf_counter() - accepted}
    return step


def own_pool_step(filler):
    """The engine's pool (grammar_fill.BitmaskFiller): accept slices and fill slices on its threads;
    `accept_slices` is start + wait_accepted, `own_step` the whole step to result."""
    def step(grammars, new_tokens):
        start = time.perf_counter()
        fill = filler.start(new_tokens, grammars)
        assert all(fill.wait_accepted())
        accepted = time.perf_counter()
        bitmask, rows = (t.clone() for t in fill.result())
        return bitmask, rows, {"accept_slices": accepted - start, "own_step": time.perf_counter() - start}
    return step


def own_fill_step(filler):
    """The batched accept on this thread, then the engine's pool fills (`slices`, fill only)."""
    from splitserve.shared.grammar_fill import accept_tokens

    def step(grammars, new_tokens):
        assert all(accept_tokens(new_tokens))
        start = time.perf_counter()
        bitmask, rows = (t.clone() for t in filler.build(grammars))
        return bitmask, rows, {"slices": time.perf_counter() - start}
    return step


def fresh_states(compiled, vocab_size: int, rows: int, steps: int, num_threads: int) -> dict[str, float]:
    """Every way on fresh states at `num_threads`; all must draw the same tokens."""
    import torch

    from splitserve.shared.grammar import bitmask_width
    from splitserve.shared.grammar_fill import BitmaskFiller

    xgrammar_step = xgrammar_pool_step(num_threads, bitmask_width(vocab_size))
    result, drawn = stepped(compiled, vocab_size, rows, steps, xgrammar_step)
    for make in (own_fill_step, own_pool_step):
        filler = BitmaskFiller(vocab_size, torch.device("cpu"), num_threads)
        times, tokens = stepped(compiled, vocab_size, rows, steps, make(filler))
        filler.close()
        assert tokens == drawn, f"{make.__name__} at {num_threads} threads drew other tokens"
        result.update(times)
    return result


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
        fresh = fresh_states(compiled, args.vocab_size, args.rows, args.advance, num_threads)
        row.update({f"fresh_{name}_ms": ms for name, ms in fresh.items()})
        result["rows"].append(row)
    _print(args, result)
    return result


def _print(args, result: dict) -> None:
    print(f"\nvocabulary {args.vocab_size}, {args.rows} rows advanced {args.advance} tokens, {os.cpu_count()} cores; "
          f"medians of {args.repeats}")
    print(f"batched accept {result['accept_ms']:.3f} ms; per-row fill on one thread {result['per_row_ms']:.3f} ms")
    print("repeated states: pool, slices (fill only); fresh states: accept (one call, this thread), pool and "
          "slices (fill only), accept slices (start + wait_accepted), own step (start to result)")
    names = ("pool", "slices", "fresh_accept", "fresh_pool", "fresh_slices", "fresh_accept_slices", "fresh_own_step")
    print(f"{'threads':>7s} " + " ".join(f"{name + ' ms':>22s}" for name in names))
    for r in result["rows"]:
        print(f"{r['threads']:7d} " + " ".join(f"{r[name + '_ms']:22.3f}" for name in names))


if __name__ == "__main__":
    main()
