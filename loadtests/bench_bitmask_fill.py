"""What a step's structured-output bitmask costs on the host: per-row fill and accept, and thread scaling.

    python loadtests/bench_bitmask_fill.py --vocab-size 128256 --rows 256 --threads 1,2,4,8,16

CPU only (no model): the tokenizer of bench_structured.py (a byte-level vocabulary of the given
size, as large and varied as a real one) and its JSON schema; `--rows` matchers run `--steps`
decode steps the way the async engine runs them (BitmaskFiller.start: the workers accept the last
step's tokens, then fill; result), tokens drawn under the mask from seeded noise, so the states
vary (keys, strings, between items) and every thread count must draw the same tokens. Per thread
count, medians over the steps: "accept wait", what the step loop waits for before it goes on
(hand-off + the slowest worker's accept), "accept+fill" until the mask is ready, per row and as a
speed-up over the first count, and "inline fill", the fill alone on the step loop's thread
(synchronous steps, xgrammar's own threads). Read with the GPU run of bench_structured.py: on a
decode step the accept wait is the step loop's cost, and accept+fill must fit beside its work.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_structured import schema, write_tokenizer  # noqa: E402


def compile_schema(vocab_size: int, output_len: int):
    from splitserve.shared.grammar import GrammarCompiler
    from splitserve.shared.structured_outputs import StructuredOutputsParams

    model_dir = tempfile.mkdtemp(prefix="bitmask-fill-")
    write_tokenizer(model_dir, vocab_size - min(256, vocab_size // 16))
    compiler = GrammarCompiler(model_dir, vocab_size)
    compiled = compiler.submit(StructuredOutputsParams(json=schema(output_len))).result(timeout=600)
    compiler.close()
    return compiled


def run_steps(compiled, vocab_size: int, rows: int, num_threads: int, steps: int, warm: int) -> dict:
    """`steps` decode steps of `rows` fresh matchers, as the async engine runs them: the workers
    accept the last step's tokens and fill this step's rows (BitmaskFiller.start, result); the
    next tokens are drawn under the mask from seeded noise, so every thread count sees the same
    states. Times the steps after `warm` (medians) and returns the tokens drawn."""
    import torch

    from splitserve.shared.grammar import RequestGrammar, apply_bitmask
    from splitserve.shared.grammar_fill import BitmaskFiller

    generator = torch.Generator().manual_seed(0)
    filler = BitmaskFiller(vocab_size, torch.device("cpu"), num_threads)
    grammars = [RequestGrammar(compiled, [1]) for _ in range(rows)]
    new_tokens, drawn, accept_s, step_s, inline_s = [], [], [], [], []
    for step in range(steps):
        start = time.perf_counter()
        fill = filler.start(new_tokens, grammars)
        accepted = time.perf_counter()
        bitmask, indices = fill.result()
        end = time.perf_counter()
        assert all(fill.accepted)
        if step >= warm:
            accept_s.append(accepted - start)
            step_s.append(end - start)
            start = time.perf_counter()
            filler.build(grammars)  # the same fill on this thread (synchronous steps)
            inline_s.append(time.perf_counter() - start)
        logits = torch.randn(rows, vocab_size, generator=generator)
        apply_bitmask(logits, bitmask, indices)
        tokens = logits.argmax(dim=-1).tolist()
        drawn.append(tokens)
        new_tokens = list(zip(grammars, tokens))
    filler.close()
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {"threads": num_threads, "accept_ms": median(accept_s) * 1e3, "step_ms": median(step_s) * 1e3,
            "inline_fill_ms": median(inline_s) * 1e3, "tokens": drawn}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab-size", type=int, default=128256)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--threads", default="1,2,4,8,16", help="comma-separated thread counts")
    parser.add_argument("--output-len", type=int, default=128, help="the schema's minItems (bench_structured.py)")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warm", type=int, default=4, help="steps not timed (states still alike)")
    parser.add_argument("--result-json", default=None)
    args = parser.parse_args(argv)
    compiled = compile_schema(args.vocab_size, args.output_len)
    rows = []
    for num_threads in [int(t) for t in args.threads.split(",")]:
        row = run_steps(compiled, args.vocab_size, args.rows, num_threads, args.steps, args.warm)
        assert not rows or row["tokens"] == rows[0]["tokens"], f"{num_threads} threads drew other tokens than 1"
        rows.append(row)
    for row in rows:
        row.pop("tokens")
        row["us_per_row"] = row["step_ms"] * 1e3 / args.rows
        row["speedup"] = rows[0]["step_ms"] / row["step_ms"]
    print(f"\nvocabulary {args.vocab_size}, {args.rows} rows, {os.cpu_count()} cores, medians of {args.steps - args.warm} "
          f"steps; accept + fill on the workers, and the same fill on the step loop's thread (xgrammar's threads)")
    print(f"{'threads':>7s} {'accept wait ms':>15s} {'accept+fill ms':>15s} {'µs/row':>8s} {'speed-up':>9s} "
          f"{'inline fill ms':>15s}")
    for r in rows:
        print(f"{r['threads']:7d} {r['accept_ms']:15.3f} {r['step_ms']:15.3f} {r['us_per_row']:8.2f} {r['speedup']:8.2f}x "
              f"{r['inline_fill_ms']:15.3f}")
    result = {"args": vars(args), "rows": rows}
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
