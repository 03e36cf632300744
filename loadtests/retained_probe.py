"""Where a retained turn's TTFT goes, beside a fresh prompt of the same new tokens (issue 11).

    python loadtests/retained_probe.py --shape pipeline-tiny --device cpu            # CPU, a few minutes
    python loadtests/retained_probe.py --shape llama-3.1-8b --device cuda --json OUT.json

A retained turn is a keyed (`prompt_cache_key`) request whose history H is cached on the device,
plus N new tokens; its fresh twin is an unkeyed prompt of N random tokens. For each history length
of `--history-lens` the probe measures, in one process where it can:

    (a) gateway   the gateway's own functions on the real request: the JSON body parsed into its
                  pydantic model, `prepare_completion` (validation), the router's choice (session
                  lookup, prefix-affinity hashing), the proto conversion; plus the chat-template
                  render + tokenization of a conversation as long (a chat client's cost) and the
                  session bookkeeping after the turn (`remember_session`)
    (b) engine    an `LLM` engine alone (tier + retention as `agent_bench.py`'s probe stack):
                  add_request to first token, split into the step's parts (prefix lookup and
                  hashing, the scheduler, the forward, sampling, the tier's save); the attention
                  FLOPs over the history are printed beside (real extra work)
    (c) served    a colocated `splitserve up` stack: streamed TTFT of both requests

so (c) - (a) - (b) is what the serving path adds. A table prints; `--json` writes the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests", "services"))

from shapes import SHAPES  # noqa: E402
from workload import add_shape_arg  # noqa: E402

KEY = "probe"
ENGINE_PARTS = ("lookup", "schedule", "forward", "sample", "save", "retain")
GATEWAY_PARTS = ("parse", "prepare", "route", "proto", "chat_render", "remember")


def ms(seconds: float) -> float:
    return seconds * 1e3


def median_ms(values: list[float]) -> float:
    return ms(statistics.median(values)) if values else 0.0


class PartTimer:
    """Wraps bound methods so each call's time adds to a named part (the probe's own view of a step)."""

    def __init__(self, sync=lambda: None) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.sync = sync

    def wrap(self, owner, method: str, part: str) -> None:
        inner = getattr(owner, method)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.sync()
                self.totals[part] += time.perf_counter() - start

        setattr(owner, method, timed)

    def take(self) -> dict[str, float]:
        taken, self.totals = dict(self.totals), defaultdict(float)
        return taken


# ---- (b) the engine alone ------------------------------------------------------------------

def build_engine(model_dir: str, args: argparse.Namespace):
    import torch

    from splitserve.shared.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from splitserve.shared.llm import LLM

    config = EngineConfig(
        model=ModelConfig(model_dir, device=args.device, load_format="dummy"),
        cache=CacheConfig(args.block_size, args.num_blocks, args.gpu_memory_utilization,
                          kv_offload_gib=args.kv_offload_gib),
        scheduler=SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens, async_scheduling=False))
    engine = LLM.from_engine_config(config, skip_tokenizer_init=True).engine
    cuda = engine.runner.device.type == "cuda"
    timer = PartTimer(torch.cuda.synchronize if cuda else (lambda: None))
    timer.wrap(engine.kv, "get_computed_blocks", "lookup")
    timer.wrap(engine.scheduler, "schedule", "schedule")
    timer.wrap(engine.runner, "execute_async", "forward")
    timer.wrap(engine.runner, "sample", "sample")
    timer.wrap(engine._external, "save_new_blocks", "save")
    timer.wrap(engine._external, "retain_session", "retain")
    return engine, timer


def first_token_s(engine, request_id: str, prompt: list[int], keyed: bool, max_tokens: int = 1) -> tuple[float, int]:
    """add_request -> the step that emits its first token; runs the request to its end. Returns
    (seconds, cached tokens)."""
    from splitserve.shared.request import SessionHint
    from splitserve.shared.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    engine.add_request(request_id, prompt, params, session=SessionHint(KEY, 3600.0) if keyed else None)
    ttft, cached = None, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == request_id and out.new_token_ids and ttft is None:
                ttft = time.perf_counter() - start
            if out.request_id == request_id and out.finished:
                cached = out.num_cached_tokens
    return ttft or 0.0, cached


def engine_pairs(engine, timer: PartTimer, history: list[int], rng: random.Random, args, vocab: int) -> dict:
    """The history is run keyed once (retained); then pairs of (history + new tokens keyed, the
    new tokens alone fresh), each pair's parts timed separately."""
    first_token_s(engine, f"warm-{len(history)}", history, keyed=True)
    parts = {"retained": defaultdict(list), "fresh": defaultdict(list)}
    cached = []
    for pair in range(args.pairs):
        new = [rng.randrange(10, vocab) for _ in range(args.new_len)]
        timer.take()
        ttft, num_cached = first_token_s(engine, f"r-{len(history)}-{pair}", history + new, keyed=True)
        cached.append(num_cached)
        _file(parts["retained"], ttft, timer.take())
        ttft, _ = first_token_s(engine, f"f-{len(history)}-{pair}", [rng.randrange(10, vocab) for _ in new], keyed=False)
        _file(parts["fresh"], ttft, timer.take())
    summary = {kind: {name: median_ms(v) for name, v in p.items()} for kind, p in parts.items()}
    summary["retained"]["cached_tokens"] = statistics.median(cached)
    return summary


def _file(parts: dict, ttft: float, taken: dict[str, float]) -> None:
    parts["ttft"].append(ttft)
    for name in ENGINE_PARTS:
        parts[name].append(taken.get(name, 0.0))


def attention_gflop(shape: str, history_len: int, new_len: int) -> float:
    """The extra attention work of N new tokens over an H-token history: QK^T and PV, 4 FLOPs a
    (query, key, head dim) over every query head and layer."""
    c = SHAPES[shape]
    head_dim = c.get("head_dim", c["hidden_size"] // c["num_attention_heads"])
    return 4 * new_len * history_len * c["num_attention_heads"] * head_dim * c["num_hidden_layers"] / 1e9


# ---- (a) the gateway's work ----------------------------------------------------------------

def gateway_parts(model_dir: str, history: list[int], new: list[int], args) -> dict[str, dict[str, float]]:
    from splitserve.services.gateway.prepare import PrepareContext, prepare_completion
    from splitserve.services.gateway.request_models import CompletionRequest
    from splitserve.services.gateway.router import Router
    from splitserve.shared.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    ctx = PrepareContext(tokenizer, 1 << 20, _limits(), 8)
    router = Router(worker_urls=["w0"])
    _make_routable(router, args.block_size)
    out = {}
    for kind, prompt, key in (("retained", history + new, KEY), ("fresh", new, None)):
        times = defaultdict(list)
        for _ in range(args.gateway_repeats):
            router.remember_session(KEY, router.instances[0], history + [1])
            raw = json.dumps(_body(prompt, key))
            _timed(times, "parse", lambda: CompletionRequest.model_validate_json(raw))
            body = CompletionRequest.model_validate_json(raw)
            prep = _timed(times, "prepare", lambda: prepare_completion(body, ctx))
            _timed(times, "route", lambda: router.route(prep.prompts[0], key))
            _timed(times, "proto", lambda: _to_proto(prep))
            text = " ".join(f"w{t}" for t in prompt)
            _timed(times, "chat_render", lambda: _render_and_tokenize(tokenizer, text))
            if key:  # after the turn: the session directory records where its blocks are
                turn = prompt + [1] * args.output_len
                _timed(times, "remember", lambda: router.remember_session(KEY, router.instances[0], turn))
        out[kind] = {name: median_ms(v) for name, v in times.items()}
    return out


def _timed(times: dict, name: str, fn):
    start = time.perf_counter()
    result = fn()
    times[name].append(time.perf_counter() - start)
    return result


def _body(prompt: list[int], key: str | None) -> dict:
    body = {"model": "m", "prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}
    if key:
        body["prompt_cache_key"] = key
    return body


def _limits():
    from splitserve.services.gateway.config import RequestLimits

    return RequestLimits()


def _make_routable(router, block_size: int) -> None:
    """One healthy colocated instance with a load report, as the gateway's poll leaves it."""
    from splitserve.shared.protocol.convert import WorkerLoad

    load = WorkerLoad("w0", "colocated", "m", 1 << 20, block_size, num_free_blocks=1 << 20, num_total_blocks=1 << 20)
    router.update_load(router.instances[0], load)


def _to_proto(prep) -> bytes:
    from splitserve.shared.protocol import convert
    from splitserve.shared.protocol import worker_pb2 as pb

    msg = pb.GenerateRequest(request_id=prep.request_id, prompt_token_ids=prep.prompts[0],
                             sampling_params=convert.sampling_params_to_proto(prep.params))
    if prep.session is not None:
        msg.session.CopyFrom(convert.session_to_proto(prep.session))
    return msg.SerializeToString()


def _render_and_tokenize(tokenizer, text: str) -> list[int]:
    """A conversation as long as the prompt, rendered (the template the demo checkpoints use)
    and tokenized whole, as a chat request is on every turn."""
    from splitserve.shared.tokenizer import apply_chat_template

    messages = [{"role": "user", "content": text}]
    return apply_chat_template(tokenizer, messages)


CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}<|assistant|>"


# ---- (c) the served stack ------------------------------------------------------------------

def served_rows(model_dir: str, histories: dict[int, list[int]], rng: random.Random, args, vocab: int,
                out_dir: str) -> dict[int, dict]:
    """One colocated stack; each history (a session of its own key) is warmed, then its pairs run."""
    from stack import LocalStack

    flags = ["--colocated", "--kv-offload-gib", str(args.kv_offload_gib), "--block-size", str(args.block_size),
             "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--model", model_dir, "--load-format", "dummy"]
    if args.num_blocks:
        flags += ["--num-blocks", str(args.num_blocks)]
    if args.gpu_memory_utilization:
        flags += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    trace_dir = tempfile.mkdtemp(prefix="trace-", dir=out_dir)
    flags += ["--step-trace", os.path.join(trace_dir, "steps-{pid}.csv")]
    with LocalStack(flags, os.path.join(out_dir, "cache"), device=args.device) as stack:
        served = asyncio.run(_served(stack.url, histories, rng, args, vocab))
    _add_engine_steps(served, trace_dir, args)
    return served


def _add_engine_steps(served: dict[int, dict], trace_dir: str, args) -> None:
    """The served engine's own step time for each request (its one prefill step: max_tokens 1),
    from its --step-trace: the steps of exactly --new-len tokens alternate retained, fresh, in
    the order the histories ran (a warm-up's steps are longer)."""
    import csv

    steps = []
    for name in os.listdir(trace_dir):
        with open(os.path.join(trace_dir, name)) as f:
            steps += [row for row in csv.DictReader(f) if int(row["tokens"]) == args.new_len]
    steps.sort(key=lambda row: float(row["start_s"]))
    step_s = [float(row["step_ms"]) / 1e3 for row in steps]
    for i, history_len in enumerate(served):
        mine = step_s[2 * args.pairs * i: 2 * args.pairs * (i + 1)]
        served[history_len]["retained"]["engine_step"] = median_ms(mine[0::2])
        served[history_len]["fresh"]["engine_step"] = median_ms(mine[1::2])


async def _served(url: str, histories: dict[int, list[int]], rng: random.Random, args, vocab: int) -> dict:
    import httpx

    served = {}
    async with httpx.AsyncClient(timeout=600) as http:
        model = (await http.get(f"{url}/v1/models")).json()["data"][0]["id"]
        for history_len, history in histories.items():
            key = f"{KEY}-{history_len}"
            ttfts = defaultdict(list)
            await _stream_ttft(http, url, model, history, key)
            for _ in range(args.pairs):
                new = [rng.randrange(10, vocab) for _ in range(args.new_len)]
                ttfts["retained"].append(await _stream_ttft(http, url, model, history + new, key))
                ttfts["fresh"].append(await _stream_ttft(http, url, model, [rng.randrange(10, vocab) for _ in new], None))
            served[history_len] = {kind: {"ttft": median_ms(v)} for kind, v in ttfts.items()}
    return served


async def _stream_ttft(http, url: str, model: str, prompt: list[int], key: str | None) -> float:
    body = dict(_body(prompt, key), model=model, max_tokens=1)
    start = time.perf_counter()
    async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if line.startswith("data: ") and '"token_ids"' in line:
                return time.perf_counter() - start
    raise RuntimeError("the stream ended without a token")


# ---- the run -------------------------------------------------------------------------------

def write_model(shape: str, max_len: int) -> str:
    from serve_compare import vocab_tokenizer
    from shapes import write_shape

    model_dir = write_shape(shape, tempfile.mkdtemp(prefix=f"retained-{shape}-"))
    config_path = os.path.join(model_dir, "config.json")
    config = json.load(open(config_path))
    # pipeline-tiny's 4k context is shorter than the histories probed (its weights are random anyway)
    config["max_position_embeddings"] = max(config["max_position_embeddings"], max_len)
    json.dump(config, open(config_path, "w"))
    tokenizer = vocab_tokenizer(SHAPES[shape]["vocab_size"])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model_dir)
    return model_dir


def run(args: argparse.Namespace) -> list[dict]:
    lengths = [int(h) for h in args.history_lens.split(",")]
    model_dir = write_model(args.shape, 2 * (max(lengths) + args.new_len + args.output_len))
    vocab = SHAPES[args.shape]["vocab_size"]
    rng = random.Random(args.seed)
    histories = {h: [rng.randrange(10, vocab) for _ in range(h)] for h in lengths}
    rows = [{"history_len": h, "new_len": args.new_len,
             "gateway": gateway_parts(model_dir, history, history[: args.new_len], args),
             "attention_gflop": attention_gflop(args.shape, h, args.new_len)} for h, history in histories.items()]
    if "engine" in args.parts:
        engine, timer = build_engine(model_dir, args)
        for row in rows:
            row["engine"] = engine_pairs(engine, timer, histories[row["history_len"]], rng, args, vocab)
        engine.close()
        del engine, timer
        _free_device_memory()  # the served stack's worker sizes its pool from what is free
    if "served" in args.parts:
        served = served_rows(model_dir, histories, rng, args, vocab, tempfile.mkdtemp(prefix="retained-probe-"))
        for row in rows:
            row["served"] = served[row["history_len"]]
    return rows


def _free_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def print_table(rows: list[dict], args) -> None:
    print(f"\nretained turn (history H cached, keyed) vs fresh prompt of its {args.new_len} new tokens; "
          f"shape {args.shape}, device {args.device}; medians of {args.pairs} pairs, ms")
    for row in rows:
        print(f"\nH = {row['history_len']} tokens (attention over the history: {row['attention_gflop']:.1f} GFLOP)")
        print(f"  {'part':28s} {'retained':>9s} {'fresh':>9s} {'extra':>9s}")
        for group, parts in (("gateway", GATEWAY_PARTS), ("engine", ("ttft", *ENGINE_PARTS)), ("served", ("ttft", "engine_step"))):
            if group not in row:
                continue
            for part in parts:
                r, f = row[group]["retained"].get(part, 0.0), row[group]["fresh"].get(part, 0.0)
                print(f"  {group + ' ' + part:28s} {r:9.2f} {f:9.2f} {r - f:9.2f}")
        if "engine" in row:
            print(f"  engine cached tokens (retained): {row['engine']['retained']['cached_tokens']:.0f}")
        if "engine" in row and "served" in row:
            print(f"  served path adds (c - a - b): retained {_adds(row, 'retained'):.2f}, fresh {_adds(row, 'fresh'):.2f}")
        if "served" in row:
            print(f"  served path beyond its engine's step (c - a - served step): retained "
                  f"{_adds_beyond_step(row, 'retained'):.2f}, fresh {_adds_beyond_step(row, 'fresh'):.2f}")


def _adds(row: dict, kind: str) -> float:
    gateway = sum(row["gateway"][kind].get(p, 0.0) for p in ("parse", "prepare", "route", "proto"))
    return row["served"][kind]["ttft"] - gateway - row["engine"][kind]["ttft"]


def _adds_beyond_step(row: dict, kind: str) -> float:
    """The same with the served engine's own step in place of the engine alone's TTFT (on CPU
    the served engine has fewer threads than the engine alone, so its forward is slower)."""
    gateway = sum(row["gateway"][kind].get(p, 0.0) for p in ("parse", "prepare", "route", "proto"))
    return row["served"][kind]["ttft"] - gateway - row["served"][kind]["engine_step"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arg(p, "pipeline-tiny")
    p.add_argument("--device", default="auto")
    p.add_argument("--history-lens", default="1024,2048,4096,8192", help="history lengths H, comma-separated")
    p.add_argument("--new-len", type=int, default=528, help="new tokens of the retained turn (and the fresh prompt)")
    p.add_argument("--output-len", type=int, default=64, help="the turn's output, for the session bookkeeping (a)")
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--gateway-repeats", type=int, default=20)
    p.add_argument("--parts", default="gateway,engine,served")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=2048, help="device pool (0: sized by the engine)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    p.add_argument("--kv-offload-gib", type=float, default=1.0)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the rows here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rows = run(args)
    print_table(rows, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
