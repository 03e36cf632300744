"""The engine process: `EngineCore` in an interpreter of its own, a busy step loop fed over ZeroMQ.

    serving process (gRPC, asyncio)  ──PUSH commands──▶  engine process (this module)
         shared/async_engine.py      ◀──PUSH events────  one EngineStep per step, all requests

The step loop shares no interpreter lock with RPC serving or serialization: the serving process
decodes protobuf, runs the gRPC event loop and encodes replies; this one only drains commands,
steps, and sends each step's outputs as one msgpack message (shared/engine_protocol.py). The KV
connector (ZMQ control, UCX/NCCL data) lives here, beside the block pool it reads and writes.

Lifecycle:

    spawned by AsyncEngine ─▶ EngineCore built (model, KV pool, connector) ─▶ EngineReady
                         └─(it raised)─▶ EngineStartFailed, exit 1
    loop: drain commands ─▶ step while there is work ─▶ EngineStep ─▶ ...
          nothing to step ─▶ sleep in one poll on the command socket and the connector's wake-up
                             pipe (KV in flight: a load landed, a hold was released)
          Shutdown ─▶ connector closed, exit 0 (no interpreter teardown: nothing is left to tear down)
          a step raised ─▶ EngineFailed, exit 1 (the serving process fails its streams and exits)
          the parent died ─▶ exit (PR_SET_PDEATHSIG kills it at once; the parent pid is also
                             checked whenever the loop is idle)

SIGINT is ignored here: Ctrl-C reaches the whole process group, and the serving process stops
the engine itself, after its gRPC server.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import uuid

import torch
import zmq

from splitserve.shared.engine import EngineCore
from splitserve.shared.engine_output import EngineOutput
from splitserve.shared.engine_parts import apply_cpu_threads
from splitserve.shared.engine_protocol import (AbortRequest, AbortResult, AddRequest, EngineFailed, EngineReady,
                                               EngineStartFailed, EngineStep, Shutdown, command_decoder, encoder)
from splitserve.shared.lifetime import die_with_parent
from splitserve.shared.request import KvTransferParams

logger = logging.getLogger(__name__)

IDLE_POLL_MS = 50
"""How long an idle loop waits for a command (or, with only KV in flight, for its connector's
wake-up) before it checks its parent and its stats again."""
GIL_SWITCH_INTERVAL_S = 0.0005
"""The KV connector's threads (ZMQ control, UCX completions) wake on I/O and then need the
interpreter lock, which the step loop holds while it runs Python. With CPython's default 5 ms
switch interval each such wake-up waited ~5 ms (p50) behind a loop running pure Python, about six
times per KV load; at 0.5 ms it waits ~0.7 ms (`loadtests/handoff_probe.py --gil`, docs/benchmarks.md
section 6). The shorter interval costs nothing while no other thread wants the lock."""


def run_engine_process(config, role: str, connector_factory, command_address: str, event_address: str,
                       parent_pid: int, log_level: int) -> None:
    """The process's target (multiprocessing, spawn). Exits 0 after Shutdown, 1 on failure."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked by the parent around start
    die_with_parent(parent_pid)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s engine-{role} %(name)s: %(message)s")
    context = zmq.Context()
    commands, events = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    commands.connect(command_address)
    events.connect(event_address)
    try:
        code = _serve(config, role, connector_factory, commands, events, parent_pid)
    finally:
        commands.close(linger=0)
        events.close(linger=5000)  # the last message (a failure, say) must reach the parent
        context.term()
    _exit_at_once(code)


def _exit_at_once(code: int) -> None:
    """Exit without the interpreter's teardown. Everything the process owns (core, connector,
    ranks, sockets) is closed by now; what remains is torch's modules and caches, whose teardown
    took this process 1.5-2.5 s of a loaded core, and every worker's stop (every test stack's)
    waited for it."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _serve(config, role, connector_factory, commands, events, parent_pid) -> int:
    try:
        apply_cpu_threads(config, beside_server=True)
        core = EngineCore(config, connector_factory)
    except Exception as exc:  # a bad checkpoint, no memory: the worker's start-up fails with this
        logger.exception("engine start-up failed")
        events.send(encoder.encode(EngineStartFailed(f"{type(exc).__name__}: {exc}")))
        return 1
    wakeup = Wakeup()
    try:
        instance_id = getattr(core.connector, "instance_id", None) or f"{role}-{uuid.uuid4().hex[:12]}"
        events.send(encoder.encode(EngineReady(instance_id, core.max_model_len, core.block_size, core.stats(),
                                               torch.get_num_threads())))
        return EngineLoop(core, commands, events, parent_pid, wakeup).run()
    finally:
        core.close()
        wakeup.close()  # after the connector's threads stopped: none writes to it any more


class Wakeup:
    """A pipe that wakes the loop's poll from another thread (the connector's): `set` writes a
    byte, `clear` drains them. Level-triggered, so a wake-up set between clear and the next poll
    is not lost."""

    def __init__(self) -> None:
        self.fd, self._write_fd = os.pipe()
        for fd in (self.fd, self._write_fd):
            os.set_blocking(fd, False)

    def set(self) -> None:
        try:
            os.write(self._write_fd, b"w")
        except (BlockingIOError, OSError):  # full: a wake-up is pending already; closed: the loop is gone
            pass

    def clear(self) -> None:
        try:
            while os.read(self.fd, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        for fd in (self.fd, self._write_fd):
            os.close(fd)


class EngineLoop:
    """Drain commands, step, send one EngineStep per step; only this thread touches the core."""

    def __init__(self, core: EngineCore, commands: zmq.Socket, events: zmq.Socket, parent_pid: int,
                 wakeup: Wakeup) -> None:
        self.core, self.commands, self.events, self.parent_pid = core, commands, events, parent_pid
        self.pending: list[EngineOutput] = []
        """Outputs made by commands (an abort's final output) that go out with the next message."""
        self.rejected: list[tuple[str, str]] = []
        self.last_report = None
        self.poller = zmq.Poller()
        self.poller.register(commands, zmq.POLLIN)
        self.wakeup = wakeup
        self.poller.register(self.wakeup.fd, zmq.POLLIN)
        if core.connector is not None:
            core.connector.set_wakeup(self.wakeup.set)

    def run(self) -> int:
        try:
            while True:
                if not self._wait_for_work():
                    logger.error("the serving process is gone; the engine process exits")
                    return 1
                if not self._drain_commands():
                    return 0
                self._step()
        except Exception as exc:  # the engine is unusable: say why, then exit for a restart
            logger.exception("engine step loop died")
            self.events.send(encoder.encode(EngineFailed(f"{type(exc).__name__}: {exc}")))
            return 1

    def _wait_for_work(self) -> bool:
        """Sleeps while there is nothing to step: until a command comes, or (KV in flight) the
        connector's wake-up, or the poll's timeout. No sleep while a step has work. False once the
        serving process is gone (checked at each timeout)."""
        core = self.core
        if core.has_unfinished_requests() and not core.waits_on_connector_only():
            return True
        ready = dict(self.poller.poll(IDLE_POLL_MS))
        if self.wakeup.fd in ready:
            self.wakeup.clear()  # before the step's poll(): an event queued after it wakes the next wait
        return bool(ready) or os.getppid() == self.parent_pid

    def _step(self) -> None:
        core = self.core
        if not core.has_unfinished_requests():
            self._send_step([])  # connector counters may have moved on their own threads
            return
        self._send_step(core.step())

    def _send_step(self, outputs: list[EngineOutput]) -> None:
        """One message with every request's outputs of this step, plus the stats after it; nothing
        when there is nothing new (an idle loop, or a step that only polled a transfer)."""
        counters = self._counters()
        connector = self.core.connector
        failure = connector.failure() if connector is not None else None
        report = (self.core.stats(), counters, failure)
        if self.pending:
            outputs, self.pending = self.pending + outputs, []
        if not outputs and not self.rejected and report == self.last_report:
            return
        self.last_report = report
        step = EngineStep(outputs, self.rejected, report[0], counters, failure)
        self.rejected = []
        self.events.send(encoder.encode(step), copy=False)

    def _counters(self) -> dict[str, int]:
        connector = self.core.connector
        if connector is None:
            return {}
        return {k: int(v) for k, v in connector.stats().items() if isinstance(v, (int, float))}

    def _drain_commands(self) -> bool:
        """Apply every queued command; False once Shutdown arrived."""
        while True:
            try:
                message = self.commands.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return True
            command = command_decoder.decode(message.buffer)
            if isinstance(command, Shutdown):
                return False
            if isinstance(command, AbortRequest):
                self._abort(command)
            else:
                self._add(command)

    def _abort(self, command: AbortRequest) -> None:
        found = self.core.abort_request(command.request_id)
        if found:
            # Someone may still read the stream (an Abort RPC, not the stream's own cancellation):
            # it must end rather than wait for tokens that never come.
            self.pending.append(EngineOutput(command.request_id, finished=True, finish_reason="abort"))
        if command.reply_id is not None:
            self._send_step([])  # the abort's final output goes first
            self.events.send(encoder.encode(AbortResult(command.reply_id, found)))

    def _add(self, command: AddRequest) -> None:
        kv_transfer = KvTransferParams(hold=True) if command.hold_kv else (
            KvTransferParams(handle=command.kv_handle) if command.kv_handle is not None else None)
        try:
            self.core.add_request(command.request_id, command.prompt_token_ids, command.params,
                                  priority=command.priority, kv_transfer=kv_transfer, first_token=command.first_token,
                                  session=command.session)
        except ValueError as exc:
            self.rejected.append((command.request_id, str(exc)))
