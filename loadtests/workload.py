"""The workload flags and random prompts the load-test scripts share.

    add_shape_arg(parser, "llama-3.2-1b")                      # --shape, one of shapes.SHAPES
    add_model_arg(parser)                                      # --model DIR | demo
    add_workload_args(parser, num_prompts=256, input_len=512, output_len=128)
    add_engine_args(parser, max_num_batched_tokens=16384, gpu_memory_utilization=0.85)
    random_prompts(num, length, vocab, low=1000, seed=0)       # token-id prompts, reproducible
    add_start_together_arg(parser)                             # --start-stacks-together
    for name, stack in started_in_turn(start, names, args.start_stacks_together, exit_stack): ...

Each script keeps its own defaults (they are part of its documented command lines); only the
flags' names, types and the way prompts are drawn live here, so one spelling holds everywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import random
from collections.abc import Callable, Iterator

from shapes import SHAPES

MODEL_HELP = "checkpoint dir, or 'demo'; default: --shape with dummy weights"


def add_shape_arg(parser: argparse.ArgumentParser, default: str, extra: tuple[str, ...] = ()) -> None:
    """--shape: a real model shape of shapes.py (written as a config; weights are dummy), or `extra`."""
    parser.add_argument("--shape", default=default, choices=[*extra, *sorted(SHAPES)])


def add_model_arg(parser: argparse.ArgumentParser, help: str = MODEL_HELP) -> None:  # noqa: A002 - argparse's name
    parser.add_argument("--model", default=None, help=help)


def add_workload_args(parser: argparse.ArgumentParser, *, num_prompts: int, input_len: int, output_len: int) -> None:
    """--num-prompts requests of --input-len prompt tokens, each generating --output-len tokens."""
    parser.add_argument("--num-prompts", type=int, default=num_prompts)
    parser.add_argument("--input-len", type=int, default=input_len)
    parser.add_argument("--output-len", type=int, default=output_len)


def add_engine_args(parser: argparse.ArgumentParser, *, max_num_batched_tokens: int, gpu_memory_utilization: float,
                    gpu_memory_help: str | None = None, max_num_seqs: int = 256) -> None:
    """The engine's batch limits and memory share, as `splitserve up` and LLM(...) spell them."""
    parser.add_argument("--max-num-seqs", type=int, default=max_num_seqs)
    parser.add_argument("--max-num-batched-tokens", type=int, default=max_num_batched_tokens)
    parser.add_argument("--gpu-memory-utilization", type=float, default=gpu_memory_utilization, help=gpu_memory_help)


def random_prompts(num: int, length: int, vocab: int, *, low: int = 1000, seed: int = 0) -> list[list[int]]:
    """`num` prompts of `length` token ids drawn uniformly from [low, vocab) (low skips the special
    and byte tokens at the start of most vocabularies), the same for the same arguments."""
    rng = random.Random(seed)
    return [[rng.randrange(low, vocab) for _ in range(length)] for _ in range(num)]


def add_start_together_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--start-stacks-together", action="store_true",
                        help="start every stack of the run at once, up front, so that their start-ups overlap "
                             "(the idle ones share the machine with the one under load: for quick checks, such "
                             "as the CPU tests, not for measurements)")


def started_in_turn(start: Callable[[str], object], names: list[str], together: bool,
                    started: contextlib.ExitStack) -> Iterator[tuple[str, object]]:
    """(name, start(name)) for each of `names`, each started when its turn comes, or all up front
    when `together`. `start` returns a server already starting (a tests/services/stack.py
    LocalStack); every one started is stopped when `started` closes, also when a later one fails."""
    def begin(name: str):
        server = start(name)
        started.push(server.__exit__)
        return server

    if together:
        yield from list(zip(names, [begin(name) for name in names]))
    else:
        for name in names:
            yield name, begin(name)
