"""Serving benchmark for an OpenAI-compatible HTTP server (splitserve's gateway, or any other).

Sends a workload (see `datasets.py`) at a request rate with Gamma/Poisson arrivals, streams every
response over SSE with asyncio + aiohttp, and measures TTFT, ITL, TPOT and end-to-end latency on the
raw `data:` chunks as they arrive (see `metrics.py`). Prints a summary table, and optionally writes
a JSON file with the summary and every request's measurements, and PNG plots.

    python loadtests/bench_serve.py --base-url http://127.0.0.1:8000 --endpoint completions \
        --dataset random --random-input-len 256 --random-output-len 64 --num-prompts 200 \
        --request-rate 8 --goodput ttft:500 tpot:50 --result-json out/bench.json --plot-dir out/

`--sweep-rates 1,2,4` runs the same workload at each rate in turn and plots throughput and p99
TTFT against the rate. The exit status is 1 if some run completed no request at all.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from pathlib import Path

import aiohttp
from tqdm.asyncio import tqdm

if __package__ in (None, ""):  # run as a script: make `loadtests` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtests import plots  # noqa: E402
from loadtests.datasets import (  # noqa: E402
    SampleRequest,
    arrival_gaps_s,
    random_requests,
    sharegpt_synthetic_requests,
)
from loadtests.metrics import BenchmarkSummary, RequestResult, aggregate, parse_slos  # noqa: E402

ENDPOINT_PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


class ServerProtocolError(RuntimeError):
    """The server's response is not the OpenAI streaming format."""


# ----------------------------------------------------------------------------- one request


def build_payload(endpoint: str, model: str, sample: SampleRequest, temperature: float, ignore_eos: bool) -> dict:
    """The JSON body of a streaming completions or chat request for `sample`."""
    body: dict = {
        "model": model,
        "max_tokens": sample.expected_output_len,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if endpoint == "completions":
        body["prompt"] = sample.prompt
    else:
        if not isinstance(sample.prompt, str):
            raise ValueError("chat requests need text prompts, got token ids")
        body["messages"] = [{"role": "user", "content": sample.prompt}]
    if ignore_eos:
        body["ignore_eos"] = True  # vLLM's extension to the OpenAI API
    return body


def chunk_text(chunk: dict) -> str:
    """The generated text an SSE chunk carries (completions `text` or chat `delta.content`)."""
    parts = []
    for choice in chunk.get("choices") or []:
        if "delta" in choice:
            parts.append((choice["delta"] or {}).get("content") or "")
        else:
            parts.append(choice.get("text") or "")
    return "".join(parts)


async def _stream_request(client: aiohttp.ClientSession, url: str, body: dict, result: RequestResult) -> None:
    """Send one request and fill `result` from its SSE stream. Raises on any protocol failure."""
    start = time.perf_counter()
    last_chunk_s = 0.0
    text_chunks = 0
    saw_done = False
    async with client.post(url, json=body) as response:
        if response.status != 200:
            detail = (await response.read()).decode(errors="replace")[:300]
            raise ServerProtocolError(f"HTTP {response.status}: {detail}")
        async for raw in response.content:  # one line at a time
            if not raw.startswith(b"data:"):
                continue  # blank separators, comments, `event:` lines
            data = raw[len(b"data:"):].strip().decode()
            if data == "[DONE]":
                saw_done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise ServerProtocolError(f"error event in stream: {chunk['error']}")
            now = time.perf_counter()
            if chunk_text(chunk):
                if text_chunks == 0:
                    result.ttft_s = now - start
                else:
                    result.itl_s.append(now - last_chunk_s)
                last_chunk_s = now
                text_chunks += 1
            usage = chunk.get("usage")
            if usage:
                result.prompt_len = int(usage.get("prompt_tokens") or result.prompt_len)
                result.output_tokens = int(usage.get("completion_tokens") or 0)
    result.e2e_s = time.perf_counter() - start
    if not saw_done:
        raise ServerProtocolError("stream ended without `data: [DONE]`")
    if text_chunks == 0:
        raise ServerProtocolError("stream carried no generated text")
    result.output_tokens = result.output_tokens or text_chunks
    result.success = True


async def send_request(
    client: aiohttp.ClientSession, url: str, body: dict, prompt_len: int, timeout_s: float, start_s: float = 0.0
) -> RequestResult:
    """One streaming request, measured. Never raises: failures come back with `error` set."""
    result = RequestResult(prompt_len=prompt_len, start_s=start_s)
    try:
        await asyncio.wait_for(_stream_request(client, url, body, result), timeout=timeout_s)
    except asyncio.TimeoutError:
        result.error = f"timed out after {timeout_s:g} s"
    except (aiohttp.ClientError, ServerProtocolError, json.JSONDecodeError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    if result.error:
        result.success = False
    return result


# ----------------------------------------------------------------------------- one run


async def run_at_rate(
    client: aiohttp.ClientSession, args: argparse.Namespace, model: str, samples: list[SampleRequest], request_rate: float
) -> tuple[list[RequestResult], float]:
    """Send every sample at `request_rate`; return the results and the run's wall seconds."""
    url = args.base_url.rstrip("/") + ENDPOINT_PATHS[args.endpoint]
    gaps_s = arrival_gaps_s(len(samples), request_rate, args.burstiness, args.seed)
    limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    progress = tqdm(total=len(samples), disable=args.disable_tqdm, desc=f"rate {plots.rate_label(request_rate)}")
    t0 = time.perf_counter()

    async def one(sample: SampleRequest) -> RequestResult:
        body = build_payload(args.endpoint, model, sample, args.temperature, args.ignore_eos)
        if limit is None:
            result = await send_request(client, url, body, sample.prompt_len, args.timeout_s, time.perf_counter() - t0)
        else:
            async with limit:
                result = await send_request(client, url, body, sample.prompt_len, args.timeout_s, time.perf_counter() - t0)
        progress.update(1)
        return result

    tasks = []
    send_at_s = 0.0
    for sample, gap_s in zip(samples, gaps_s):
        send_at_s += gap_s  # sleep to absolute targets so timer slack does not accumulate
        delay_s = send_at_s - (time.perf_counter() - t0)
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        tasks.append(asyncio.create_task(one(sample)))
    results = await asyncio.gather(*tasks)
    duration_s = time.perf_counter() - t0
    progress.close()
    return list(results), duration_s


def format_summary(summary: BenchmarkSummary, request_rate: float) -> str:
    """A fixed-width table of the run's numbers."""
    width = 50
    rows = [
        " Serving benchmark ".center(width, "="),
        ("Offered request rate", plots.rate_label(request_rate)),
        ("Successful requests", summary.completed),
        ("Failed requests", summary.failed),
        ("Benchmark duration (s)", f"{summary.duration_s:.2f}"),
        ("Total input tokens", summary.total_input_tokens),
        ("Total generated tokens", summary.total_output_tokens),
        ("Request throughput (req/s)", f"{summary.request_throughput:.2f}"),
    ]
    if summary.goodput is not None:
        rows.append(("Request goodput (req/s)", f"{summary.goodput:.2f}"))
    rows += [
        ("Output token throughput (tok/s)", f"{summary.output_throughput:.2f}"),
        ("Total token throughput (tok/s)", f"{summary.total_token_throughput:.2f}"),
    ]
    for name, stats in (("TTFT", summary.ttft), ("TPOT", summary.tpot), ("ITL", summary.itl),
                        ("first gap", summary.first_gap), ("E2E", summary.e2el)):
        rows.append(f" {name} ".center(width, "-"))
        rows += [(f"Mean {name} (ms)", f"{stats.mean_ms:.2f}"), (f"Median {name} (ms)", f"{stats.median_ms:.2f}"),
                 (f"Std {name} (ms)", f"{stats.std_ms:.2f}")]
        rows += [(f"{key.upper()} {name} (ms)", f"{value:.2f}") for key, value in stats.percentiles_ms.items()
                 if key != "p50"]  # the median row already shows it
    rows.append("=" * width)
    lines = [row if isinstance(row, str) else f"{row[0] + ':':<36}{row[1]!s:>14}" for row in rows]
    lines += [f"error: {error}" for error in summary.errors]
    return "\n".join(lines)


def run_record(request_rate: float, summary: BenchmarkSummary, results: list[RequestResult]) -> dict:
    """The JSON record of one run: its summary and every request's measurements (ms)."""
    return {
        "request_rate": "inf" if math.isinf(request_rate) else request_rate,
        "summary": summary.to_dict(),
        "requests": [
            {
                "success": r.success, "error": r.error, "start_s": r.start_s, "prompt_len": r.prompt_len,
                "output_tokens": r.output_tokens, "ttft_ms": r.ttft_s * 1e3, "e2el_ms": r.e2e_s * 1e3,
                "tpot_ms": None if r.tpot_s is None else r.tpot_s * 1e3, "itl_ms": [g * 1e3 for g in r.itl_s],
            }
            for r in results
        ],
    }


def latencies_ms(results: list[RequestResult]) -> dict[str, list[float]]:
    ok = [r for r in results if r.success]
    return {
        "ttft_ms": [r.ttft_s * 1e3 for r in ok],
        "tpot_ms": [r.tpot_s * 1e3 for r in ok if r.tpot_s is not None],
        "itl_ms": [g * 1e3 for r in ok for g in r.itl_s],
        "e2el_ms": [r.e2e_s * 1e3 for r in ok],
    }


# ----------------------------------------------------------------------------- CLI


def parse_rate(text: str) -> float:
    rate = float(text)  # accepts "inf"
    if not rate > 0:
        raise argparse.ArgumentTypeError(f"request rate must be > 0 or inf, got {text!r}")
    return rate


def parse_rates(text: str) -> list[float]:
    return [parse_rate(part) for part in text.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--endpoint", choices=sorted(ENDPOINT_PATHS), default="completions")
    p.add_argument("--model", default=None, help="model name to request (default: the first of /v1/models)")
    p.add_argument("--dataset", choices=("random", "sharegpt-synthetic"), default="random")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--random-input-len", type=int, default=128)
    p.add_argument("--random-output-len", type=int, default=64)
    p.add_argument("--random-range-ratio", type=float, default=0.0, help="lengths uniform in len*(1±r)")
    p.add_argument("--random-vocab-size", type=int, default=4096, help="random token ids are drawn below this")
    p.add_argument("--request-rate", type=parse_rate, default=float("inf"), help="req/s, or inf for all at once")
    p.add_argument("--burstiness", type=float, default=1.0, help="Gamma shape of arrivals; 1.0 = Poisson")
    p.add_argument("--sweep-rates", type=parse_rates, default=None, help="comma-separated rates, one run each")
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action="store_true", help="generate max_tokens whatever the model says")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--goodput", nargs="+", default=[], metavar="METRIC:MS", help="SLOs: ttft:MS tpot:MS e2el:MS")
    p.add_argument("--timeout-s", type=float, default=300.0, help="per-request limit, whole stream")
    p.add_argument("--result-json", type=Path, default=None)
    p.add_argument("--plot-dir", type=Path, default=None)
    p.add_argument("--disable-tqdm", action="store_true")
    return p


def validate_args(args: argparse.Namespace) -> None:
    if args.num_prompts < 1:
        raise SystemExit(f"--num-prompts must be >= 1, got {args.num_prompts}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise SystemExit(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    if args.timeout_s <= 0:
        raise SystemExit(f"--timeout-s must be > 0, got {args.timeout_s}")
    try:
        args.slos_ms = parse_slos(args.goodput)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


def make_samples(args: argparse.Namespace) -> list[SampleRequest]:
    as_token_ids = args.endpoint == "completions"
    if args.dataset == "random":
        return random_requests(args.num_prompts, args.random_input_len, args.random_output_len, args.random_range_ratio,
                               as_token_ids=as_token_ids, vocab_size=args.random_vocab_size, seed=args.seed)
    return sharegpt_synthetic_requests(args.num_prompts, as_token_ids=as_token_ids,
                                       vocab_size=args.random_vocab_size, seed=args.seed)


async def first_model(client: aiohttp.ClientSession, base_url: str) -> str:
    async with client.get(base_url.rstrip("/") + "/v1/models") as response:
        response.raise_for_status()
        models = (await response.json()).get("data") or []
    if not models:
        raise SystemExit(f"{base_url}/v1/models lists no model; pass --model")
    return models[0]["id"]


async def main_async(args: argparse.Namespace) -> int:
    samples = make_samples(args)
    rates = args.sweep_rates or [args.request_rate]
    # aiohttp rather than httpx: at thousands of SSE events a second the client's own per-event cost
    # must stay far below the server's (httpx cost about twice the gateway's CPU per event here).
    connector = aiohttp.TCPConnector(limit=args.max_concurrency or 0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as client:
        model = args.model or await first_model(client, args.base_url)
        runs = []
        for rate in rates:
            results, duration_s = await run_at_rate(client, args, model, samples, rate)
            summary = aggregate(results, duration_s, args.slos_ms)
            print(format_summary(summary, rate), flush=True)
            runs.append((rate, summary, results))
    write_outputs(args, model, runs)
    return 0 if all(summary.completed > 0 for _, summary, _ in runs) else 1


def write_outputs(args: argparse.Namespace, model: str, runs: list[tuple[float, BenchmarkSummary, list]]) -> None:
    if args.result_json:
        config = {k: v for k, v in vars(args).items() if k not in ("result_json", "plot_dir", "sweep_rates", "request_rate")}
        config.update(model=model, request_rates=[plots.rate_label(r) for r, _, _ in runs])
        record = {"config": config, "runs": [run_record(rate, s, res) for rate, s, res in runs]}
        args.result_json.parent.mkdir(parents=True, exist_ok=True)
        args.result_json.write_text(json.dumps(record, indent=2, default=str))
    if args.plot_dir:
        plots.plot_latency_cdfs([(rate, latencies_ms(res)) for rate, _, res in runs], args.plot_dir / "latency_cdf.png")
        if args.sweep_rates:
            plots.plot_rate_sweep(
                [rate for rate, _, _ in runs], [s.output_throughput for _, s, _ in runs],
                [s.request_throughput for _, s, _ in runs], [s.ttft.percentiles_ms.get("p99", 0.0) for _, s, _ in runs],
                args.plot_dir / "rate_sweep.png",
            )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    validate_args(args)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
