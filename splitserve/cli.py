"""The `splitserve` command.

    splitserve generate [--model DIR] --prompt TEXT [sampling flags]   offline generation
    splitserve up [--prefill N --decode M | --colocated] [--model DIR]  the local stack as processes
    splitserve gateway|prefill|decode|worker [...]                     one service (what docker-compose runs)

Engine flags (`--block-size`, `--max-num-seqs`, ...) are generated from the config dataclasses.
"""

from __future__ import annotations

import argparse
import sys


def _add_generate(sub) -> None:
    from splitserve.shared.config_flags import add_engine_flags

    p = sub.add_parser("generate", help="generate text offline with the engine in this process")
    add_engine_flags(p)
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the CLI's default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--sampling-seed", type=int, default=None, help="per-request seed")
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--logprobs", type=int, default=None)
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")


def _run_generate(args: argparse.Namespace) -> int:
    from splitserve.shared.config_flags import engine_config_from_args
    from splitserve.shared.engine import RequestError
    from splitserve.shared.llm import LLM
    from splitserve.shared.sampling_params import SamplingParams

    try:
        params = SamplingParams(
            n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
            seed=args.sampling_seed, presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty, repetition_penalty=args.repetition_penalty,
            max_tokens=args.max_tokens, stop=args.stop, ignore_eos=args.ignore_eos, logprobs=args.logprobs)
        llm = LLM.from_engine_config(engine_config_from_args(args))
        try:
            if args.chat:
                results = [llm.chat([{"role": "user", "content": p}], params)[0] for p in args.prompt]
            else:
                results = llm.generate(args.prompt, params)
        finally:
            llm.close()  # tensor-parallel ranks stop with it
    except (ValueError, FileNotFoundError, RequestError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for result in results:
        for out in result.outputs:
            print(out.text)
            print(f"[{len(out.token_ids)} tokens, finish_reason={out.finish_reason}]", file=sys.stderr)
    return 0


def _add_services(sub) -> None:
    from splitserve.services.flags import add_service_parsers

    add_service_parsers(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitserve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_services(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    import logging

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "generate":
        return _run_generate(args)
    from splitserve.shared.lifetime import die_with_launcher

    die_with_launcher()
    return args.run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
