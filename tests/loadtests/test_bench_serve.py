"""Tests of the serving benchmark client: metrics and workload by hand-computed values, and the
client end to end against a real HTTP server (a small stand-in that streams OpenAI-format SSE,
started in this module: the client is what is under test here, not the gateway)."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # loadtests/ is not an installed package
    sys.path.insert(0, str(REPO_ROOT))

from loadtests import bench_serve  # noqa: E402
from loadtests.datasets import (  # noqa: E402
    FIRST_RANDOM_TOKEN_ID,
    SHAREGPT_SYNTHETIC,
    SampleRequest,
    arrival_gaps_s,
    random_requests,
    ranged_lengths,
    sharegpt_synthetic_requests,
)
from loadtests.metrics import (  # noqa: E402
    RequestResult,
    aggregate,
    latency_stats,
    meets_slos,
    parse_slos,
    percentile,
)

# ----------------------------------------------------------------------------- metrics


def test_percentile_interpolates_between_ranks():
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 90) == pytest.approx(3.7)  # rank 0.9 * 3 = 2.7 -> 3 + 0.7
    assert percentile(values, 100) == 4.0
    assert percentile([], 99) == 0.0
    with pytest.raises(ValueError, match="percentile"):
        percentile(values, 101)


def test_latency_stats_in_ms():
    stats = latency_stats([0.010, 0.020, 0.030, 0.040])
    assert stats.mean_ms == pytest.approx(25.0)
    assert stats.median_ms == pytest.approx(25.0)
    assert stats.std_ms == pytest.approx(math.sqrt(125.0))  # population std of 10,20,30,40
    assert stats.percentiles_ms["p99"] == pytest.approx(39.7)
    assert set(stats.percentiles_ms) == {"p50", "p90", "p99"}


def test_tpot_needs_two_tokens_and_success():
    assert RequestResult(success=True, output_tokens=10, ttft_s=0.1, e2e_s=1.0).tpot_s == pytest.approx(0.1)
    assert RequestResult(success=True, output_tokens=1, ttft_s=0.1, e2e_s=0.1).tpot_s is None
    assert RequestResult(success=False, output_tokens=10, ttft_s=0.1, e2e_s=1.0).tpot_s is None


@pytest.mark.parametrize("spec", ["ttft", "foo:10", "ttft:abc", "tpot:-5"])
def test_parse_slos_rejects_bad_specs(spec):
    with pytest.raises(ValueError, match="bad goodput SLO"):
        parse_slos([spec])


def test_parse_slos():
    assert parse_slos(["ttft:500", "tpot:50", "e2el:2000"]) == {"ttft": 500.0, "tpot": 50.0, "e2el": 2000.0}


def _three_results() -> list[RequestResult]:
    a = RequestResult(success=True, prompt_len=10, output_tokens=5, ttft_s=0.1, itl_s=[0.1] * 4, e2e_s=0.5)
    b = RequestResult(success=True, prompt_len=20, output_tokens=3, ttft_s=0.3, itl_s=[0.1] * 2, e2e_s=0.5)
    c = RequestResult(success=False, prompt_len=7, error="boom")
    return [a, b, c]


def test_aggregate_hand_computed():
    summary = aggregate(_three_results(), duration_s=2.0, slos_ms={"ttft": 200.0})
    assert (summary.completed, summary.failed) == (2, 1)
    assert (summary.total_input_tokens, summary.total_output_tokens) == (30, 8)
    assert summary.request_throughput == pytest.approx(1.0)
    assert summary.output_throughput == pytest.approx(4.0)
    assert summary.total_token_throughput == pytest.approx(19.0)
    assert summary.goodput == pytest.approx(0.5)  # only the first meets TTFT <= 200 ms
    assert summary.ttft.mean_ms == pytest.approx(200.0)
    assert summary.tpot.mean_ms == pytest.approx(100.0)  # (0.5-0.1)/4 and (0.5-0.3)/2
    assert summary.itl.mean_ms == pytest.approx(100.0)
    assert summary.e2el.median_ms == pytest.approx(500.0)
    assert summary.errors == ["boom"]
    assert aggregate(_three_results(), 2.0).goodput is None


def test_goodput_counts_requests_meeting_every_slo():
    a, b, c = _three_results()
    slos = {"tpot": 150.0, "e2el": 600.0}
    assert meets_slos(a, slos) and meets_slos(b, slos) and not meets_slos(c, slos)
    assert aggregate([a, b, c], 4.0, slos).goodput == pytest.approx(0.5)
    assert not meets_slos(b, {"ttft": 250.0, "e2el": 600.0})
    with pytest.raises(ValueError, match="duration"):
        aggregate([a], 0.0)


# ----------------------------------------------------------------------------- workload


def test_random_requests_exact_lengths_and_deterministic():
    reqs = random_requests(20, input_len=32, output_len=8, seed=3, vocab_size=500)
    assert all(r.prompt_len == 32 == len(r.prompt) and r.expected_output_len == 8 for r in reqs)
    assert all(FIRST_RANDOM_TOKEN_ID <= t < 500 for r in reqs for t in r.prompt)
    assert reqs == random_requests(20, input_len=32, output_len=8, seed=3, vocab_size=500)
    assert reqs != random_requests(20, input_len=32, output_len=8, seed=4, vocab_size=500)
    ranged = random_requests(30, input_len=32, output_len=8, range_ratio=0.5, seed=3)
    assert ranged[:10] == random_requests(10, input_len=32, output_len=8, range_ratio=0.5, seed=3)


def test_random_requests_ranged_and_text():
    reqs = random_requests(200, input_len=100, output_len=10, range_ratio=0.5, as_token_ids=False, seed=0)
    in_lens = [r.prompt_len for r in reqs]
    assert min(in_lens) >= 50 and max(in_lens) <= 150 and len(set(in_lens)) > 20
    assert all(5 <= r.expected_output_len <= 15 for r in reqs)
    assert all(isinstance(r.prompt, str) and len(r.prompt.split()) == r.prompt_len for r in reqs)
    with pytest.raises(ValueError, match="range ratio"):
        ranged_lengths(np.random.default_rng(0), 10, 1.0, 3)
    with pytest.raises(ValueError, match="num_prompts"):
        random_requests(0, 10, 10)


def test_sharegpt_synthetic_shape():
    reqs = sharegpt_synthetic_requests(3000, seed=1, vocab_size=1000)
    assert reqs[:5] == sharegpt_synthetic_requests(5, seed=1, vocab_size=1000)[:5]
    shape = SHAREGPT_SYNTHETIC
    in_lens = [r.prompt_len for r in reqs]
    out_lens = [r.expected_output_len for r in reqs]
    assert all(shape.min_len_tokens <= n <= shape.max_prompt_tokens for n in in_lens)
    assert all(i + o <= shape.max_total_tokens and o >= shape.min_len_tokens for i, o in zip(in_lens, out_lens))
    # The clipping trims the tails a little; the medians stay near the documented ones.
    assert statistics.median(in_lens) == pytest.approx(shape.input_median_tokens, rel=0.15)
    assert statistics.median(out_lens) == pytest.approx(shape.output_median_tokens, rel=0.15)
    assert statistics.mean(in_lens) > 1.3 * statistics.median(in_lens)  # right-skewed like real chats


def test_arrivals_mean_is_inverse_rate_and_burstiness_sets_variance():
    n, rate = 20000, 4.0
    poisson = arrival_gaps_s(n, rate, burstiness=1.0, seed=0)
    assert statistics.mean(poisson) == pytest.approx(1 / rate, rel=0.03)
    # Gamma(k, 1/(rate k)): std = 1 / (rate sqrt(k)); Poisson gaps have std == mean.
    for burstiness in (0.25, 1.0, 4.0):
        gaps = arrival_gaps_s(n, rate, burstiness=burstiness, seed=0)
        assert statistics.mean(gaps) == pytest.approx(1 / rate, rel=0.05)
        assert statistics.pstdev(gaps) == pytest.approx(1 / (rate * math.sqrt(burstiness)), rel=0.07)
    assert arrival_gaps_s(3, float("inf")) == [0.0, 0.0, 0.0]
    assert arrival_gaps_s(5, 2.0, seed=9) == arrival_gaps_s(5, 2.0, seed=9)
    with pytest.raises(ValueError, match="burstiness"):
        arrival_gaps_s(3, 1.0, burstiness=0.0)


def test_payload_and_chunk_text():
    text_sample = SampleRequest("a b c", 3, 4)
    chat = bench_serve.build_payload("chat", "m", text_sample, 0.0, ignore_eos=True)
    assert chat["messages"] == [{"role": "user", "content": "a b c"}] and chat["ignore_eos"] is True
    assert chat["stream_options"] == {"include_usage": True} and chat["max_tokens"] == 4
    with pytest.raises(ValueError, match="text prompts"):
        bench_serve.build_payload("chat", "m", SampleRequest([1, 2], 2, 4), 0.0, ignore_eos=False)
    assert bench_serve.chunk_text({"choices": [{"delta": {"role": "assistant", "content": ""}}]}) == ""
    assert bench_serve.chunk_text({"choices": [{"delta": {"content": "hi"}}]}) == "hi"
    assert bench_serve.chunk_text({"choices": [{"index": 0, "text": "yo"}]}) == "yo"
    assert bench_serve.chunk_text({"choices": [], "usage": {"completion_tokens": 3}}) == ""


# ----------------------------------------------------------------------------- a real HTTP server

STAND_IN_MODEL = "stand-in"
TOKEN_DELAY_S = 0.003


def _stand_in_app():
    """An OpenAI-format streaming server: one chunk per generated 'token', usage, then [DONE]."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": STAND_IN_MODEL, "object": "model"}]}

    async def stream(body: dict, chat: bool):
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        prompt_tokens = len(prompt) if isinstance(prompt, list) else len(prompt.split())
        num_tokens = body["max_tokens"]
        if chat:  # the role-only first chunk carries no text and must not count as the first token
            yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'role': 'assistant', 'content': ''}}]})}\n\n"
        for i in range(num_tokens):
            await asyncio.sleep(TOKEN_DELAY_S)
            choice = {"index": 0, "delta": {"content": f" t{i}"}} if chat else {"index": 0, "text": f" t{i}"}
            yield f"data: {json.dumps({'choices': [choice]})}\n\n"
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": num_tokens,
                 "total_tokens": prompt_tokens + num_tokens}
        yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
        if body["model"] != "truncating":
            yield "data: [DONE]\n\n"

    async def handle(request: Request, chat: bool):
        body = await request.json()
        if body["model"] not in (STAND_IN_MODEL, "truncating"):
            return JSONResponse({"error": {"message": f"model {body['model']} not found"}}, status_code=404)
        return StreamingResponse(stream(body, chat), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    return app


@pytest.fixture(scope="module")
def server_url():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(_stand_in_app(), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60.0
    while not server.started:
        assert time.monotonic() < deadline, "stand-in server did not start within 60 s"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10.0)
    sock.close()


def _send(url: str, body: dict, prompt_len: int, timeout_s: float = 10.0) -> RequestResult:
    async def go():
        async with aiohttp.ClientSession() as client:
            return await bench_serve.send_request(client, url, body, prompt_len, timeout_s)

    return asyncio.run(go())


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_send_request_measures_stream(server_url, endpoint):
    prompt = [100, 101, 102] if endpoint == "completions" else "three word prompt"
    body = bench_serve.build_payload(endpoint, STAND_IN_MODEL, SampleRequest(prompt, 99, 6), 0.0, False)
    result = _send(server_url + bench_serve.ENDPOINT_PATHS[endpoint], body, prompt_len=99)
    assert result.success, result.error
    assert result.output_tokens == 6 and len(result.itl_s) == 5
    assert result.prompt_len == 3  # the server's usage wins over the workload's estimate
    assert 0 < result.ttft_s < result.e2e_s
    assert all(gap > 0 for gap in result.itl_s)
    assert result.ttft_s + sum(result.itl_s) <= result.e2e_s


def test_send_request_failures_are_values(server_url):
    url = server_url + "/v1/completions"
    sample = SampleRequest([100, 101], 2, 200)
    slow = _send(url, bench_serve.build_payload("completions", STAND_IN_MODEL, sample, 0.0, False), 2, timeout_s=0.2)
    assert not slow.success and "timed out after 0.2 s" in slow.error
    missing = _send(url, bench_serve.build_payload("completions", "nope", sample, 0.0, False), 2)
    assert not missing.success and "HTTP 404" in missing.error and "nope" in missing.error
    short = SampleRequest([100], 1, 2)
    cut = _send(url, bench_serve.build_payload("completions", "truncating", short, 0.0, False), 1)
    assert not cut.success and "[DONE]" in cut.error


def test_all_failed_run_exits_1_and_records_errors(server_url, tmp_path):
    out = tmp_path / "fail.json"
    rc = bench_serve.main(["--base-url", server_url, "--model", "nope", "--num-prompts", "3",
                           "--random-input-len", "4", "--random-output-len", "2", "--result-json", str(out),
                           "--disable-tqdm"])
    assert rc == 1
    run = json.loads(out.read_text())["runs"][0]
    assert run["summary"]["completed"] == 0 and run["summary"]["failed"] == 3
    assert all("HTTP 404" in e for e in run["summary"]["errors"])


def _run_bench(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loadtests.bench_serve", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_bench_serve_end_to_end_sweep(server_url, tmp_path):
    result_json, plot_dir = tmp_path / "bench.json", tmp_path / "plots"
    proc = _run_bench([
        "--base-url", server_url, "--endpoint", "completions", "--dataset", "random", "--num-prompts", "6",
        "--random-input-len", "8", "--random-output-len", "5", "--ignore-eos", "--sweep-rates", "20,inf",
        "--goodput", "ttft:1000", "tpot:1000", "--result-json", str(result_json), "--plot-dir", str(plot_dir),
        "--disable-tqdm", "--seed", "1",
    ])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Serving benchmark" in proc.stdout and "Request goodput (req/s)" in proc.stdout
    record = json.loads(result_json.read_text())
    assert record["config"]["model"] == STAND_IN_MODEL
    assert [run["request_rate"] for run in record["runs"]] == [20.0, "inf"]
    for run in record["runs"]:
        summary = run["summary"]
        assert (summary["completed"], summary["failed"]) == (6, 0)
        assert (summary["total_input_tokens"], summary["total_output_tokens"]) == (48, 30)
        assert summary["goodput"] <= summary["request_throughput"] + 1e-9
        for req in run["requests"]:
            assert 0 < req["ttft_ms"] < req["e2el_ms"]
            assert len(req["itl_ms"]) == req["output_tokens"] - 1 == 4
    for name in ("latency_cdf.png", "rate_sweep.png"):
        assert (plot_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_bench_serve_script_chat_sharegpt(server_url, tmp_path):
    result_json = tmp_path / "chat.json"
    proc = subprocess.run(
        [sys.executable, "loadtests/bench_serve.py", "--base-url", server_url, "--endpoint", "chat",
         "--dataset", "sharegpt-synthetic", "--num-prompts", "4", "--request-rate", "50", "--burstiness", "0.5",
         "--max-concurrency", "2", "--result-json", str(result_json), "--disable-tqdm"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = json.loads(result_json.read_text())["runs"][0]
    expected = sharegpt_synthetic_requests(4, as_token_ids=False, seed=0)
    assert [r["prompt_len"] for r in run["requests"]] == [s.prompt_len for s in expected]
    assert [r["output_tokens"] for r in run["requests"]] == [s.expected_output_len for s in expected]
    assert run["summary"]["goodput"] is None
