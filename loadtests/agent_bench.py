"""Multi-turn agent benchmark: sessions that come back, on a device pool too small to keep them.

S sessions x T turns. Every session starts with one shared system prompt and its own first user
message; each turn streams a completion (token ids in, `return_token_ids` out, so the next prompt
extends this one exactly), then "runs a tool" for a think time and appends its result of L tokens.
Sessions arrive over time, so the device pool cannot hold them all. Each mode starts the real
stack (`splitserve up`), runs the same workload, and one table prints them side by side:

    no-tier             colocated, prefix caching only
    tier                + host-memory KV tier (--kv-offload-gib)
    tier+retention      + prompt_cache_key on every request
    disagg              prefill + decode (tier + keys), every turn split (no next-turn design)
    disagg+next-turn    prefill + decode, a mostly-cached turn runs on the decode holding it
    retained-vs-fresh   the probe (the tier+retention stack, its own device pool --probe-num-blocks):
                        one session alone, one request at a time, alternating its next keyed turn
                        (history retained on the device) with a fresh unkeyed prompt of exactly the
                        tokens that turn computed; their TTFT p50s, the ratio, and the new-token
                        prefill roofline say what a retained turn costs beyond its new tokens

Per mode: TTFT p50/p99 by turn, cached_tokens / prompt tokens, recomputed prompt tokens (prompt -
cached), output throughput, task time (a session's arrival to its last token), the worker's
restore bandwidth, and a roofline per turn kind (prefill FLOPs of only the new tokens over the
measured matmul peak; restore bytes over the measured host->device bandwidth) when on CUDA.
JSON and a PNG (TTFT p50 by turn) go to --out-dir. On CPU (a test runs it tiny):

    python loadtests/agent_bench.py --model demo --device cpu --sessions 3 --turns 2 --system-len 32 \\
        --first-len 16 --tool-len 8 --output-len 4 --num-blocks 12 --kv-offload-gib 0.01
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests", "services"))

from agent_report import plot, print_table, summarize  # noqa: E402,F401 (summarize: the tests use it here)
from stack import LocalStack, metric_total  # noqa: E402
from workload import add_model_arg, add_shape_arg, add_start_together_arg, started_in_turn  # noqa: E402

MODES = ("no-tier", "tier", "tier+retention", "disagg", "disagg+next-turn", "retained-vs-fresh")
PROBE = "retained-vs-fresh"


@dataclass
class TurnResult:
    session: int
    turn: int
    prompt_tokens: int
    cached_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float = 0.0
    end_s: float = 0.0
    error: str | None = None
    kind: str = "turn"
    """'turn' (a session's), or in the probe: 'warm' (its first turn), 'retained', 'fresh'."""


@dataclass
class ModeResult:
    mode: str
    turns: list[TurnResult] = field(default_factory=list)
    wall_s: float = 0.0
    counters: dict = field(default_factory=dict)
    session_start_s: dict = field(default_factory=dict)


def mode_args(mode: str, args: argparse.Namespace) -> list[str]:
    """The `splitserve up` flags of a mode."""
    tier = [] if mode == "no-tier" else ["--kv-offload-gib", str(args.kv_offload_gib)]
    num_blocks = args.probe_num_blocks if mode == PROBE and args.probe_num_blocks else args.num_blocks
    if mode.startswith("disagg"):
        topology = ["--prefill", "1", "--decode", "1"]
        if mode == "disagg":
            topology += ["--decode-prefill-max-new-tokens", "0"]
    else:
        topology = ["--colocated"]
    pool = ["--num-blocks", str(num_blocks)] if num_blocks else []
    if args.gpu_memory_utilization is not None:
        pool += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    return [*topology, *tier, *pool, "--block-size", str(args.block_size),
            "--max-num-batched-tokens", str(args.max_num_batched_tokens)]


def session_prompts(args: argparse.Namespace, vocab: int) -> tuple[list[int], list[list[int]], random.Random]:
    rng = random.Random(args.seed)
    system = [rng.randrange(10, vocab) for _ in range(args.system_len)]
    firsts = [[rng.randrange(10, vocab) for _ in range(args.first_len)] for _ in range(args.sessions)]
    return system, firsts, rng


async def stream_turn(http, url: str, body: dict, result: TurnResult, started: float) -> list[int]:
    """One streamed completion; fills TTFT, usage and end time; returns the generated ids."""
    ids: list[int] = []
    async with http.post(url, json=body) as response:
        if response.status != 200:
            result.error = f"HTTP {response.status}: {(await response.text())[:200]}"
            return ids
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                if choice.get("token_ids") and not ids:
                    result.ttft_s = time.perf_counter() - started
                ids += choice.get("token_ids", [])
            if chunk.get("usage"):
                result.cached_tokens = chunk["usage"]["prompt_tokens_details"]["cached_tokens"]
    result.output_tokens = len(ids)
    return ids


def turn_body(model: str, prompt: list[int], max_tokens: int, key: str | None) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}
    if key is not None:
        body["prompt_cache_key"] = key
    return body


async def timed_turn(http, url: str, body: dict, result: TurnResult, out: ModeResult, progress, t0: float) -> list[int]:
    ids = await stream_turn(http, url, body, result, time.perf_counter())
    result.end_s = time.perf_counter() - t0
    out.turns.append(result)
    progress.update(1)
    return ids


async def run_session(http, url: str, model: str, k: int, args, prompt: list[int], keyed: bool,
                      rng: random.Random, out: ModeResult, progress, t0: float) -> None:
    await asyncio.sleep(k * args.arrival_s)
    out.session_start_s[k] = time.perf_counter() - t0
    for turn in range(args.turns):
        body = turn_body(model, prompt, args.output_len, f"session-{k}" if keyed else None)
        result = TurnResult(k, turn, len(prompt))
        ids = await timed_turn(http, url, body, result, out, progress, t0)
        if result.error:
            return
        think = rng.expovariate(1 / args.think_s) if args.random_think and args.think_s else args.think_s
        await asyncio.sleep(think)
        prompt = prompt + ids + [rng.randrange(10, 1000) for _ in range(args.tool_len)]


async def run_probe(http, url: str, model: str, args, prompt: list[int], rng: random.Random, vocab: int,
                    out: ModeResult, progress, t0: float) -> None:
    """One keyed session alone: a first turn, then --probe-pairs times its next turn (history
    retained on the device) followed by a fresh unkeyed prompt of the tokens that turn computed
    (prompt - cached), random so that nothing of it is cached. One request at a time."""
    out.session_start_s[0] = 0.0
    kind = "warm"
    for pair in range(args.probe_pairs + 1):
        keyed = TurnResult(0, pair, len(prompt), kind=kind)
        ids = await timed_turn(http, url, turn_body(model, prompt, args.output_len, "probe"), keyed, out, progress, t0)
        if keyed.error:
            return
        if kind == "retained":
            fresh_prompt = [rng.randrange(10, vocab) for _ in range(keyed.prompt_tokens - keyed.cached_tokens)]
            fresh = TurnResult(1, pair, len(fresh_prompt), kind="fresh")
            await timed_turn(http, url, turn_body(model, fresh_prompt, 1, None), fresh, out, progress, t0)
        kind = "retained"
        prompt = prompt + ids + [rng.randrange(10, 1000) for _ in range(args.tool_len)]


async def run_workload(base_url: str, mode: str, args: argparse.Namespace, vocab: int) -> ModeResult:
    import aiohttp
    from tqdm.asyncio import tqdm

    system, firsts, rng = session_prompts(args, vocab)
    out = ModeResult(mode)
    timeout = aiohttp.ClientTimeout(total=args.timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async with http.get(f"{base_url}/v1/models") as r:
            model = (await r.json())["data"][0]["id"]
        url = f"{base_url}/v1/completions"
        total = 2 * args.probe_pairs + 1 if mode == PROBE else args.sessions * args.turns
        progress = tqdm(total=total, desc=mode, disable=args.disable_tqdm)
        t0 = time.perf_counter()
        keyed = mode not in ("no-tier", "tier")
        if mode == PROBE:
            await run_probe(http, url, model, args, system + firsts[0], random.Random(rng.random()), vocab,
                            out, progress, t0)
        else:
            await asyncio.gather(*(run_session(http, url, model, k, args, system + firsts[k], keyed,
                                               random.Random(rng.random()), out, progress, t0)
                                   for k in range(args.sessions)))
        out.wall_s = time.perf_counter() - t0
        progress.close()
    return out


def worker_counters(stack: LocalStack, mode: str) -> dict:
    roles = ("prefill", "decode") if mode.startswith("disagg") else ("worker",)
    return {role: dict(stack.load(role).counters) for role in roles}


def mode_stack(mode: str, args: argparse.Namespace, model_argv: list[str], out_dir: str) -> LocalStack:
    """The stack of a mode, starting (LocalStack waits for it on entry)."""
    return LocalStack([*mode_args(mode, args), *model_argv], os.path.join(out_dir, "cache"), device=args.device)


def run_mode(mode: str, args: argparse.Namespace, vocab: int, stack: LocalStack) -> ModeResult:
    with stack:
        result = asyncio.run(run_workload(stack.url, mode, args, vocab))
        result.counters = worker_counters(stack, mode)
        with urllib.request.urlopen(stack.url + "/metrics", timeout=10) as response:
            metrics = response.read().decode()
        result.counters["gateway"] = {
            "kv_transfer_bytes": metric_total(metrics, "splitserve_gateway_kv_transfer_bytes_total"),
            "routes_session_on_decode": metric_total(metrics, 'splitserve_gateway_routes_total{reason="session-on-decode"}')}
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from roofline import model_argv_and_vocab, print_roofline

    out_dir = args.out_dir or tempfile.mkdtemp(prefix="agent-bench-")
    os.makedirs(out_dir, exist_ok=True)
    model_argv, vocab = model_argv_and_vocab(args)
    modes = args.modes.split(",")
    for mode in modes:
        if mode not in MODES:
            raise SystemExit(f"unknown mode {mode!r}; choose from {MODES}")
    summaries = []
    with contextlib.ExitStack() as started:
        for mode, stack in started_in_turn(lambda mode: mode_stack(mode, args, model_argv, out_dir), modes,
                                           args.start_stacks_together, started):
            summaries.append(summarize(run_mode(mode, args, vocab, stack), args.block_size))
    print(f"\n{args.sessions} sessions x {args.turns} turns (system {args.system_len}, first {args.first_len}, "
          f"tool {args.tool_len}, output {args.output_len} tokens), pool {args.num_blocks} x {args.block_size}-token "
          f"blocks, host tier {args.kv_offload_gib} GiB; model {args.model or args.shape}, device {args.device}")
    print_table(summaries)
    roofline = print_roofline(args, summaries)
    with open(os.path.join(out_dir, "agent_bench.json"), "w") as f:
        json.dump({"args": vars(args), "modes": summaries, "roofline": roofline}, f, indent=1)
    plot(summaries, os.path.join(out_dir, "agent_ttft_by_turn.png"))
    print(f"results: {out_dir}/agent_bench.json, {out_dir}/agent_ttft_by_turn.png")
    return 1 if any(s["turns_failed"] for s in summaries) else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arg(p, "llama-3.1-8b")
    add_model_arg(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--sessions", type=int, default=32)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--system-len", type=int, default=1024, help="shared system prompt tokens")
    p.add_argument("--first-len", type=int, default=512, help="each session's first user message tokens")
    p.add_argument("--tool-len", type=int, default=256, help="tokens of the tool result appended each turn")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--think-s", type=float, default=1.0, help="tool time between turns")
    p.add_argument("--random-think", action="store_true", help="exponential think times of mean --think-s")
    p.add_argument("--arrival-s", type=float, default=0.5, help="a new session every this many seconds")
    p.add_argument("--num-blocks", type=int, default=4096,
                   help="device KV pool per worker, in blocks (0: sized by the engine from --gpu-memory-utilization)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="passed to every stack (default: the engine's); with two workers on one GPU, each one's share")
    p.add_argument("--probe-pairs", type=int, default=16, help="retained-vs-fresh: retained turns, each with its fresh twin")
    p.add_argument("--probe-num-blocks", type=int, default=0,
                   help="retained-vs-fresh: its stack's device pool (default --num-blocks); it must hold the probe's session")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-offload-gib", type=float, default=64.0)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--timeout-s", type=float, default=1800.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--out-dir", default=None)
    add_start_together_arg(p)
    return p


if __name__ == "__main__":
    raise SystemExit(main())
