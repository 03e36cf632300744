"""Rank 0's side of tensor parallelism: start the followers, mirror each model call to them, stop them.

    followers = start_followers(spec, tensor_parallel_size, device)   # this process becomes rank 0
    followers.forward(arrays, graph)   # before rank 0 runs the same forward
    followers.logits(rows)             # before rank 0's own compute_logits of those rows
    followers.gather_kv(ids) / scatter_kv(ids)  # P/D: before rank 0's side of the KV hand-over
    followers.close()                  # Stop, join, leave the process group

With one rank `NO_FOLLOWERS` stands in: every call is a no-op, so the runner calls them unconditionally.

Every call first checks that no follower has exited: a dead rank raises `ParallelError` at once
rather than leaving rank 0 in a collective until its timeout. The engine treats `ParallelError`
as fatal (the worker exits and is restarted), like a device fault.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import secrets
import signal
import time

import torch
import zmq

from splitserve.shared.config import ConfigError, EngineConfig
from splitserve.shared.parallel import state
from splitserve.shared.parallel.follower import FollowerSpec, run_follower
from splitserve.shared.parallel.messages import (BindKV, CaptureGraphs, FakeStep, Forward, GatherKV, Logits, ScatterKV,
                                                 StepArrays, Stop, seal)
from splitserve.shared.parallel.state import ParallelError

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10.0
"""How long a stopping follower may take before it is killed."""


class NoFollowers:
    """One rank: nothing to mirror."""

    world_size = 1

    def bind_kv(self, num_blocks: int, block_size: int) -> None:
        pass

    def fake_step(self, num_tokens: int, block_size: int) -> None:
        pass

    def capture_graphs(self, max_batch: int, max_model_len: int, block_size: int) -> None:
        pass

    def forward(self, arrays: StepArrays, graph: bool) -> None:
        pass

    def logits(self, rows: list[int]) -> None:
        pass

    def gather_kv(self, block_ids: list[int]) -> None:
        pass

    def scatter_kv(self, block_ids: list[int]) -> None:
        pass

    def close(self) -> None:
        pass


NO_FOLLOWERS = NoFollowers()


def follower_device(device: torch.device, rank: int) -> torch.device:
    """Rank r's device: the r-th GPU from rank 0's (cuda:i -> cuda:i+r); on CPU every rank's is cpu."""
    if device.type != "cuda":
        return device
    index = (device.index or 0) + rank
    if index >= torch.cuda.device_count():
        raise ParallelError(f"tensor-parallel rank {rank} needs cuda:{index}, but only "
                            f"{torch.cuda.device_count()} CUDA devices are visible")
    return torch.device("cuda", index)


class Followers(NoFollowers):
    def __init__(self, spec: FollowerSpec, device: torch.device) -> None:
        """Spawn ranks 1..N-1 and join the group with them as rank 0 (`spec.world_size` = N)."""
        self.world_size = spec.world_size
        self._key = secrets.token_bytes(32)
        self._context = zmq.Context()
        self._sockets: list[zmq.Socket] = []
        self.processes: list[multiprocessing.Process] = []
        try:
            self._start(spec, device)
        except BaseException:
            self.close()
            raise

    def _start(self, spec: FollowerSpec, device: torch.device) -> None:
        store = state.rendezvous(spec.world_size)
        context = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
        for rank in range(1, spec.world_size):
            sock = self._context.socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, 0)  # never drop a call
            port = sock.bind_to_random_port("tcp://127.0.0.1")
            self._sockets.append(sock)
            rank_spec = FollowerSpec(**{**spec.__dict__, "device": str(follower_device(device, rank)),
                                        "store_port": store.port})
            # daemon: a program that ends without close() terminates its followers at exit rather
            # than joining them (they would wait for calls forever)
            process = context.Process(target=run_follower, name=f"splitserve-tp-rank-{rank}", daemon=True, args=(
                rank_spec, rank, f"tcp://127.0.0.1:{port}", self._key, os.getpid(),
                logging.getLogger().getEffectiveLevel()))
            _start_without_sigint(process)
            self.processes.append(process)
        logger.info("tensor parallelism: %d ranks (followers %s)", spec.world_size,
                    ", ".join(str(p.pid) for p in self.processes))
        self._wait_until_joining(store)
        state.init_process_group(0, spec.world_size, store, device)

    def _wait_until_joining(self, store) -> None:
        """Until every follower has reached the store: one that dies on the way (an import error, no
        device) fails the start now, not after the rendezvous timeout."""
        keys = [state.joining_key(rank) for rank in range(1, self.world_size)]
        deadline = time.monotonic() + state.COLLECTIVE_TIMEOUT_S
        while not store.check(keys):
            self.check_alive()
            if time.monotonic() > deadline:
                raise ParallelError(f"tensor-parallel followers did not start within {state.COLLECTIVE_TIMEOUT_S} s")
            time.sleep(0.05)

    def _send(self, message: object) -> None:
        self.check_alive()
        frame = seal(self._key, message)
        for sock in self._sockets:
            sock.send(frame, copy=False)

    def check_alive(self) -> None:
        for rank, process in enumerate(self.processes, start=1):
            if process.exitcode is not None:
                raise ParallelError(f"tensor-parallel rank {rank} (pid {process.pid}) exited with code "
                                    f"{process.exitcode}; this worker cannot go on")

    def bind_kv(self, num_blocks: int, block_size: int) -> None:
        self._send(BindKV(num_blocks, block_size))

    def fake_step(self, num_tokens: int, block_size: int) -> None:
        self._send(FakeStep(num_tokens, block_size))

    def capture_graphs(self, max_batch: int, max_model_len: int, block_size: int) -> None:
        self._send(CaptureGraphs(max_batch, max_model_len, block_size))

    def forward(self, arrays: StepArrays, graph: bool) -> None:
        self._send(Forward(arrays, graph))

    def logits(self, rows: list[int]) -> None:
        self._send(Logits(rows))

    def gather_kv(self, block_ids: list[int]) -> None:
        self._send(GatherKV(list(block_ids)))

    def scatter_kv(self, block_ids: list[int]) -> None:
        self._send(ScatterKV(list(block_ids)))

    def close(self) -> None:
        """Stop every follower (killing one that does not stop in time), then leave the group."""
        frame = seal(self._key, Stop())
        for sock in self._sockets:
            try:
                sock.send(frame, zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        state.destroy()  # before the joins: a follower leaves the group as it exits, and may wait for rank 0
        for process in self.processes:
            process.join(STOP_TIMEOUT_S)
            if process.exitcode is None:
                logger.warning("tensor-parallel follower %d did not stop; killing it", process.pid)
                process.kill()
                process.join(STOP_TIMEOUT_S)
        for sock in self._sockets:
            sock.close(linger=0)
        self._context.term()
        self._sockets, self.processes = [], []


def check_parallel_support(config: EngineConfig) -> None:
    """What tensor parallelism does not combine with yet, refused by name before any rank starts."""
    if config.parallel.tensor_parallel_size == 1:
        return
    if config.cache.kv_offload_gib:
        raise ConfigError("kv_offload_gib (the host KV tier) is not supported yet with tensor_parallel_size > 1: "
                          "it copies one rank's pool")
    if config.scheduler.async_scheduling:
        raise ConfigError("async_scheduling is not supported with tensor_parallel_size > 1: the followers need "
                          "each step's input tokens on the host before it launches")



def _start_without_sigint(process: multiprocessing.Process) -> None:
    """Blocked until the child ignores SIGINT itself (the mask is inherited across exec)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        process.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
