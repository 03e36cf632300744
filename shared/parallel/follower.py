"""A follower rank: one process holding one shard of the model and of the KV pool, running the
model calls rank 0 sends (messages.py) and nothing else. It never schedules, samples or owns a
request.

    spawned by rank 0 ─▶ joins the process group ─▶ loads its shard ─▶ loop: recv call ─▶ run it
          Stop ─▶ exit 0
          a call raised (a collective timed out, a peer died) ─▶ exit 1 (rank 0's collectives then fail too)
          rank 0 died ─▶ SIGKILL at once (PR_SET_PDEATHSIG), or exit when the idle loop sees the
                         parent pid change
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass

import torch
import zmq

from splitserve.shared.lifetime import die_with_parent
from splitserve.shared.parallel import state
from splitserve.shared.parallel.messages import (BindKV, CaptureGraphs, FakeStep, Forward, GatherKV, Logits, ScatterKV,
                                                 StepArrays, Stop, unseal)

logger = logging.getLogger(__name__)

IDLE_POLL_MS = 1000
"""How long an idle follower waits for a call before it checks that rank 0 still lives."""


@dataclass(frozen=True)
class FollowerSpec:
    """What a follower needs to build its shard: rank 0's resolved model settings."""

    model_dir: str
    dtype: str
    device: str
    load_format: str
    seed: int
    world_size: int
    store_port: int


def run_follower(spec: FollowerSpec, rank: int, control_address: str, key: bytes, parent_pid: int,
                 log_level: int) -> None:
    """The process's target (multiprocessing, spawn). Exits 0 after Stop, 1 on failure."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group; rank 0 stops us
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked by rank 0 around start
    die_with_parent(parent_pid)
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s tp-rank-{rank} %(name)s: %(message)s")
    context = zmq.Context()
    calls = context.socket(zmq.PULL)
    calls.connect(control_address)
    try:
        code = _serve(spec, rank, calls, key, parent_pid)
    finally:
        calls.close(linger=0)
        context.term()
        state.destroy()
    raise SystemExit(code)


def _serve(spec: FollowerSpec, rank: int, calls: zmq.Socket, key: bytes, parent_pid: int) -> int:
    try:
        runtime = FollowerRuntime(spec, rank)
        while True:
            if not calls.poll(IDLE_POLL_MS):
                if os.getppid() != parent_pid:
                    logger.error("rank 0 is gone; this rank exits")
                    return 1
                continue
            message = unseal(key, calls.recv())
            if isinstance(message, Stop):
                return 0
            runtime.run(message)
    except Exception:  # a collective that failed or timed out, a bad shard: the worker is done
        logger.exception("tensor-parallel rank %d failed", rank)
        return 1


class FollowerRuntime:
    """This rank's shard and the state the calls act on (its KV pool, graphs, last hidden states)."""

    def __init__(self, spec: FollowerSpec, rank: int) -> None:
        from splitserve.shared.engine_parts import resolve_dtype
        from splitserve.shared.model.loader import load_model

        self.device = torch.device(spec.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        else:  # the ranks share the host's cores: without this each spins a full thread pool against the others
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.world_size))
        state.init_process_group(rank, spec.world_size, state.rendezvous(spec.world_size, spec.store_port),
                                 self.device)
        self.dtype = resolve_dtype(spec.dtype, self.device)
        self.model, _ = load_model(spec.model_dir, self.dtype, self.device, spec.load_format, spec.seed)
        self.kv_cache: torch.Tensor | None = None
        self.graphs = None
        self.hidden: torch.Tensor | None = None

    @torch.inference_mode()
    def run(self, message: object) -> None:
        handlers = {BindKV: self._bind_kv, FakeStep: self._fake_step, CaptureGraphs: self._capture_graphs,
                    Forward: self._forward, Logits: self._logits, GatherKV: self._gather_kv,
                    ScatterKV: self._scatter_kv}
        handler = handlers.get(type(message))
        if handler is None:
            raise ValueError(f"unknown tensor-parallel call {type(message).__name__}")
        handler(message)

    def _bind_kv(self, call: BindKV) -> None:
        attention = self.model.attention_layers()
        self.kv_cache = None  # free the previous pool first
        self.kv_cache = torch.zeros(call.num_blocks, len(attention), 2, call.block_size, attention[0].num_kv_heads,
                                    attention[0].head_dim, dtype=self.dtype, device=self.device)
        self.model.bind_kv_cache(self.kv_cache)

    def _fake_step(self, call: FakeStep) -> None:
        from splitserve.shared.runner import run_fake_mixed_step

        run_fake_mixed_step(self.model, call.num_tokens, call.block_size, self.device)

    def _capture_graphs(self, call: CaptureGraphs) -> None:
        from splitserve.shared.cuda_graphs import DecodeGraphs

        self.graphs = DecodeGraphs(self.model, call.max_batch, call.max_model_len, call.block_size, self.device)
        self.graphs.capture()

    def _forward(self, call: Forward) -> None:
        input_ids, positions, attn = step_tensors(call.arrays, self.device)
        if call.graph:
            self.hidden = self.graphs.run(input_ids, positions, attn)
        else:
            self.hidden = self.model(input_ids, positions, attn)

    def _logits(self, call: Logits) -> None:
        self.model.compute_logits(self.hidden[call.rows])  # the all-gather; rank 0 samples

    def _gather_kv(self, call: GatherKV) -> None:
        from splitserve.shared.parallel.kv_shards import gather_blocks

        gather_blocks(self.kv_cache, call.block_ids)

    def _scatter_kv(self, call: ScatterKV) -> None:
        from splitserve.shared.parallel.kv_shards import scatter_blocks

        scatter_blocks(self.kv_cache, call.block_ids, None)


def step_tensors(arrays: StepArrays, device: torch.device):
    """`(input_ids, positions, AttentionMetadata)` on `device` from rank 0's host arrays."""
    from splitserve.shared.model.attention import AttentionMetadata

    def put(array):
        return torch.from_numpy(array).to(device)

    attn = AttentionMetadata(
        query_start_loc=put(arrays.query_start_loc), seq_lens=put(arrays.seq_lens),
        block_tables=put(arrays.block_tables), slot_mapping=put(arrays.slot_mapping),
        max_query_len=max(arrays.query_lens_cpu), max_seq_len=max(arrays.seq_lens_cpu),
        query_lens_cpu=arrays.query_lens_cpu, seq_lens_cpu=arrays.seq_lens_cpu,
    )
    return put(arrays.input_ids), put(arrays.positions), attn
