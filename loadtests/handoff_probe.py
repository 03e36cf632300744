"""Where the P/D hand-off (prefill's first token -> decode's second token) spends its time.

Starts a real disaggregated stack (`splitserve up --prefill 1 --decode 1`) that exports its traces
to an OTLP receiver in this process, streams requests through the gateway one at a time, and
splits each request's first inter-token gap into phases read from the spans (all clocks are this
host's wall clock, so the processes' timestamps compare):

    prefill->gw     the prefill worker's `prefill` span ends -> the gateway has the result
    gw->decode      the gateway has the result -> the decode worker's `decode` span starts
    decode->load    the Generate arrived -> the engine started the KV load (`kv_transfer` starts)
    kv load         the load is in flight -> the engine saw it land (`kv_transfer` ends)
    decode step     the KV landed -> the decode worker has its first output (`first_output` event)
    decode->gw      the first output -> the gateway has the decode side's first chunk
    gw->client      the gateway has that chunk -> the client has the second token
    gap1            the client's first token -> its second token (the whole hand-off)

    python loadtests/handoff_probe.py                      # CPU, the demo checkpoint, UCX over TCP
    python loadtests/handoff_probe.py --shape llama-3.2-1b --device cuda --ucx-tls cuda_copy,cuda_ipc,tcp \\
        --input-len 1024 --gpu-memory-utilization 0.4

Probed requests go one after another (`--interval-s` apart), so each phase is the fixed cost of
the hand-off. `--background-streams N` keeps N other long streams decoding meanwhile, so the
decode engine is mid-step when a hand-off arrives, as under load (serve_compare.py measures gap1
under Poisson load).

`--gil` measures instead what one thread hop costs in a process whose main thread runs pure Python
(as an engine process's step loop does between its torch calls, while its KV connector threads
wake on I/O): another process writes a timestamp to a pipe every 5 ms, a thread's asyncio loop
reads it, and the delay is printed at CPython's default switch interval and at the engine
process's (shared/engine_process.py), and, for comparison, with the main thread asleep in a poll
(the engine process's loop while only KV is in flight). A main thread that gives the lock up often
(every torch call does) lets the hop through sooner; the switch interval bounds the stretches that
do not.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import select
import statistics
import struct
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests", "services"))

from otlp_receiver import TimedSpan, otlp_env, otlp_receiver  # noqa: E402
from stack import LocalStack, wait_until  # noqa: E402

PHASES = ("prefill->gw", "gw->decode", "decode->load", "kv load", "decode step", "decode->gw", "gw->client", "gap1")


def stream_one(client, model: str, prompt, output_len: int) -> tuple[str, list[int]]:
    """(completion id, unix ns at which each streamed chunk with text arrived)."""
    times, completion_id = [], None
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=output_len, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    for chunk in stream:
        completion_id = chunk.id
        if chunk.choices and chunk.choices[0].text:
            times.append(time.time_ns())
    return completion_id, times


def phases_of(spans: list[TimedSpan], client_times: list[int]) -> dict[str, float] | None:
    """The request's phases in ms (see the module docstring), or None while a span is missing."""
    by_name = {s.name: s for s in spans}
    prefill, decode, transfer = by_name.get("prefill"), by_name.get("decode"), by_name.get("kv_transfer")
    gateway = next((s for s in spans if "splitserve.prefill_returned" in s.events), None)
    if None in (prefill, decode, transfer, gateway) or "splitserve.first_output" not in decode.events \
            or "splitserve.decode_first_chunk" not in gateway.events or len(client_times) < 2:
        return None
    marks = [prefill.end_ns, gateway.events["splitserve.prefill_returned"], decode.start_ns, transfer.start_ns,
             transfer.end_ns, decode.events["splitserve.first_output"], gateway.events["splitserve.decode_first_chunk"],
             client_times[1]]
    result = {name: (b - a) / 1e6 for name, a, b in zip(PHASES, marks, marks[1:])}
    result["gap1"] = (client_times[1] - client_times[0]) / 1e6
    return result


def request_spans(receiver, completion_id: str) -> list[TimedSpan]:
    """Every span of the trace whose prefill span served `completion_id`."""
    with receiver.lock:
        timed = list(receiver.timed)
    traces = {s.trace_id for s in timed if s.name == "prefill"
              and s.attributes["splitserve.request_id"].string_value.startswith(completion_id)}
    return [s for s in timed if s.trace_id in traces]


def print_table(rows: list[dict[str, float]], itl_ms: list[float]) -> None:
    print(f"\n{'phase':14s} {'p50 ms':>8s} {'p90 ms':>8s} {'max ms':>8s}   ({len(rows)} requests)")
    for name in PHASES:
        values = sorted(row[name] for row in rows)
        p90 = values[min(len(values) - 1, int(0.9 * len(values)))]
        print(f"{name:14s} {statistics.median(values):8.2f} {p90:8.2f} {values[-1]:8.2f}")
    if itl_ms:
        print(f"{'later ITL':14s} {statistics.median(itl_ms):8.2f}   (the decode side's own token gaps, for scale)")


def stack_argv(args: argparse.Namespace) -> list[str]:
    argv = ["--prefill", "1", "--decode", "1", *args.stack_args]
    if args.ucx_tls:
        argv += ["--transfer-ucx-tls", args.ucx_tls]
    if args.gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    if args.shape:
        from serve_compare import vocab_tokenizer
        from shapes import SHAPES, write_shape

        model_dir = write_shape(args.shape, tempfile.mkdtemp(prefix=f"handoff-{args.shape}-"))
        vocab_tokenizer(SHAPES[args.shape]["vocab_size"]).save_pretrained(model_dir)
        argv += ["--model", model_dir, "--load-format", "dummy"]
    return argv


def keep_streaming(client, model: str, prompt, stop: threading.Event) -> None:
    """Background load: long streams, one after another, until `stop`."""
    while not stop.is_set():
        stream_one(client, model, prompt, 64)


def run(args: argparse.Namespace) -> list[dict[str, float]]:
    rows, itl_ms = [], []
    with otlp_receiver() as receiver, LocalStack(stack_argv(args), args.cache_dir or tempfile.mkdtemp(prefix="handoff-"),
                                                 env=otlp_env(receiver.port), device=args.device) as stack:
        client = stack.openai()
        model = client.models.list().data[0].id
        prompt = [(7 * i) % 200 + 10 for i in range(args.input_len)]  # token ids: any tokenizer
        stop = threading.Event()
        background = [threading.Thread(target=keep_streaming, args=(stack.openai(), model, prompt[::-1], stop),
                                       daemon=True) for _ in range(args.background_streams)]
        for thread in background:
            thread.start()
        try:
            probe(receiver, client, model, prompt, args, rows, itl_ms)
        finally:
            stop.set()
            for thread in background:
                thread.join(60)
    print_table(rows, itl_ms)
    return rows


def probe(receiver, client, model: str, prompt, args: argparse.Namespace, rows: list, itl_ms: list) -> None:
    for i in range(args.warmup + args.num_requests):
        completion_id, times = stream_one(client, model, prompt, args.output_len)
        if i >= args.warmup:
            got = wait_until(lambda: phases_of(request_spans(receiver, completion_id), times), timeout_s=30,
                             interval_s=0.2, message=f"the spans of {completion_id}")
            rows.append(got)
            itl_ms += [(b - a) / 1e6 for a, b in zip(times[1:], times[2:])]
        time.sleep(args.interval_s)


def _write_times(fd: int, count: int) -> None:
    time.sleep(0.2)  # the reader's loop is running by then
    for _ in range(count):
        os.write(fd, struct.pack("q", time.time_ns()))
        time.sleep(0.005)


def gil_wakeup_ms(switch_interval_s: float, count: int = 300, busy: bool = True) -> list[float]:
    """Delays (ms, sorted) from another process's write to this process's loop thread reading it,
    while the main thread runs pure Python (`busy`), or sleeps in a poll as the engine process's
    step loop does while only KV is in flight (see the module docstring)."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(switch_interval_s)
    read_fd, write_fd = os.pipe()
    # Forked before this function starts a thread; the child only writes to the pipe.
    writer = multiprocessing.get_context("fork").Process(target=_write_times, args=(write_fd, count))
    writer.start()
    loop, delays = asyncio.new_event_loop(), []
    loop.add_reader(read_fd, lambda: delays.append((time.time_ns() - struct.unpack("q", os.read(read_fd, 8))[0]) / 1e6))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    x, deadline = 0, time.monotonic() + 0.2 + count * 0.005 + 10
    while len(delays) < count and time.monotonic() < deadline:  # busy: no call here gives up the lock
        if busy:
            x += 1
        else:
            select.select([], [], [], 0.05)  # the lock is free while it waits
    writer.join()
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()
    for fd in (read_fd, write_fd):
        os.close(fd)
    sys.setswitchinterval(previous)
    return sorted(delays)


def print_gil_table() -> None:
    from splitserve.shared.engine_process import GIL_SWITCH_INTERVAL_S

    print(f"{'main thread':>12s} {'switch interval':>16s} {'hop p50 ms':>11s} {'hop p90 ms':>11s}")
    for busy, interval_s in ((True, 0.005), (True, GIL_SWITCH_INTERVAL_S), (False, GIL_SWITCH_INTERVAL_S)):
        delays = gil_wakeup_ms(interval_s, busy=busy)
        print(f"{'Python' if busy else 'in a poll':>12s} {interval_s * 1e3:13.1f} ms {statistics.median(delays):11.2f} "
              f"{delays[int(0.9 * len(delays))]:11.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default=None, help="a model shape of loadtests/shapes.py, random weights (default: "
                   "the demo checkpoint)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-requests", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2, help="requests sent first and not counted")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=8)
    p.add_argument("--interval-s", type=float, default=0.1)
    p.add_argument("--background-streams", type=int, default=0, help="other streams decoding meanwhile")
    p.add_argument("--ucx-tls", default=None, help="--transfer-ucx-tls for the workers (default: theirs)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--stack-args", default=[], type=str.split, help="more `splitserve up` flags, one string")
    p.add_argument("--gil", action="store_true", help="measure the thread wake-up cost instead (no stack)")
    args = p.parse_args(argv)
    if args.gil:
        print_gil_table()
        return 0
    rows = run(args)
    return 0 if rows else 1


if __name__ == "__main__":
    raise SystemExit(main())
