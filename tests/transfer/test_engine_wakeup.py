"""The engine process's step loop with only KV in flight sleeps until its connector wakes it,
instead of stepping on a timer. The loop runs in a thread here, over real ZeroMQ sockets, with a
real decode connector (UCX over TCP) whose load nobody answers, and an idle poll of ten minutes:
only the connector's wake-up can end its wait within the test's bounds."""

from __future__ import annotations

import csv
import os
import socket
import threading

import pytest
import zmq

from splitserve.shared import engine_process
from splitserve.shared.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from splitserve.shared.engine import EngineCore
from splitserve.shared.engine_process import EngineLoop, Wakeup
from splitserve.shared.engine_protocol import AddRequest, EngineStep, Shutdown, encoder, event_decoder
from splitserve.shared.runner import SampledToken
from splitserve.shared.sampling_params import SamplingParams
from splitserve.shared.transfer.handle import KV_HANDLE_VERSION, KvHandle

pytestmark = pytest.mark.timeout(300)

LOAD_TIMEOUT_S = 1.0


def decode_connector(parts):
    """A real decode side (UCX over TCP), its loads bounded at LOAD_TIMEOUT_S."""
    from splitserve.shared.transfer.connector import TransferConfig, TransferConnector

    return TransferConnector(parts.kv_cache, TransferConfig(role="decode", ucx_tls="tcp", model_id="wakeup",
                                                            timeout_s=LOAD_TIMEOUT_S))


def _unanswered_address() -> str:
    """A control address where nothing listens: the load's messages go unanswered."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


def _outputs_until_finished(events: zmq.Socket, request_id: str, timeout_s: float) -> list[int]:
    tokens = []
    while events.poll(timeout_s * 1000):
        event = event_decoder.decode(events.recv())
        for out in event.outputs if isinstance(event, EngineStep) else ():
            if out.request_id == request_id:
                tokens += out.new_token_ids
                if out.finished:
                    return tokens
    raise AssertionError(f"no output for {timeout_s} s: the loop slept through the connector's event")


@pytest.fixture
def loop_sockets():
    context = zmq.Context()
    sockets = [context.socket(kind) for kind in (zmq.PUSH, zmq.PULL, zmq.PUSH, zmq.PULL)]
    sockets[0].bind("inproc://commands"), sockets[1].connect("inproc://commands")
    sockets[3].bind("inproc://events"), sockets[2].connect("inproc://events")
    yield sockets
    for sock in sockets:
        sock.close(linger=0)
    context.term()


def test_a_load_in_flight_is_slept_through_until_its_failure_wakes_the_loop(checkpoint_factory, tmp_path,
                                                                          monkeypatch, loop_sockets):
    monkeypatch.setattr(engine_process, "IDLE_POLL_MS", 600_000)
    trace = tmp_path / "steps.csv"
    core = EngineCore(EngineConfig(model=ModelConfig(model=checkpoint_factory("llama"), device="cpu"),
                                   cache=CacheConfig(num_blocks=64, block_size=4),
                                   scheduler=SchedulerConfig(step_trace=str(trace))), decode_connector)
    send_commands, commands, events, receive_events = loop_sockets
    wakeup = Wakeup()
    exit_codes = []
    thread = threading.Thread(target=lambda: exit_codes.append(
        EngineLoop(core, commands, events, os.getppid(), wakeup).run()), daemon=True)
    thread.start()
    prompt = list(range(10, 22))
    handle = KvHandle(KV_HANDLE_VERSION, "gone-prefill", "r", (0, 1, 2), len(prompt), core.connector.transfer.layout_hash,
                      _unanswered_address())
    try:
        send_commands.send(encoder.encode(AddRequest("r", prompt, SamplingParams(max_tokens=4, temperature=0),
                                                     kv_handle=handle, first_token=SampledToken(5, 0.0, 1, ()))))
        tokens = _outputs_until_finished(receive_events, "r", timeout_s=60)
        send_commands.send(encoder.encode(Shutdown()))
        thread.join(60)
    finally:
        core.close()
        wakeup.close()
    assert exit_codes == [0] and len(tokens) == 3  # the first token came with the handle

    steps = list(csv.DictReader(open(trace)))
    # One step started the load (nothing to compute yet); the next one, woken by the failure,
    # recomputed the prompt here; no step ran in between.
    assert [int(s["tokens"]) for s in steps[:2]] == [0, len(prompt) + 1], steps
    in_flight_s = float(steps[1]["start_s"]) - float(steps[0]["start_s"])
    assert in_flight_s >= LOAD_TIMEOUT_S * 0.9, steps
