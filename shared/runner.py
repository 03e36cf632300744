"""Model runner: turns a `SchedulerOutput` into tensors, runs the model, samples.

Mechanism only: the scheduler decided what runs; this builds, for the flat batch of T new
tokens across B requests,

    input_ids [T], positions [T], slot_mapping [T]          (one entry per new token)
    query_start_loc [B+1], seq_lens [B], block_tables [B, max_blocks]   (one row per request)

(block_tables and slot_mapping once per KV layer group when the pool is split by group; see
shared/kv/layer_groups.py),

runs `model.forward`, takes the hidden state of the last new token of every request that has
caught up with its known tokens, and samples one token for each of those.

Under tensor parallelism this runs on rank 0 only: before each model call it sends the same call
to the followers (`followers.forward(arrays)`, `followers.logits(rows)`), which run their shards
in step; the LM head gathers the logits, and sampling stays here.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from splitserve.shared.cuda_graphs import DecodeGraphs
from splitserve.shared.grammar import bitmask_width
from splitserve.shared.model.attention import AttentionMetadata
from splitserve.shared.parallel.driver import NO_FOLLOWERS, NoFollowers
from splitserve.shared.parallel.messages import StepArrays
from splitserve.shared.prompt_logprobs import compute_prompt_logprobs, prompt_rows
from splitserve.shared.request import Request
from splitserve.shared.engine_output import SampledToken
from splitserve.shared.sampler import Bitmask, DeviceSample, Sampler, SamplerOutput, SamplingInput, as_of_now, unpack
from splitserve.shared.scheduler import SchedulerOutput


@dataclass
class ModelRunnerOutput:
    sampled: SamplerOutput
    """Row i: the token sampled for the i-th scheduled request that samples this step (those that
    caught up with their known tokens), in scheduled order."""
    prompt_logprobs: dict[str, tuple[int, list[SampledToken]]] = field(default_factory=dict)
    """Request id -> (index of the first prompt token scored, their logprobs), for requests
    that asked for prompt logprobs and had prompt tokens computed this step."""


PLACEHOLDER = -1
"""Token id of an output whose value is still on the device (async scheduling)."""


@dataclass
class PendingStep:
    """A launched step: which requests it samples, and their results still on the device."""

    request_ids: list[str]
    sample: DeviceSample | None
    host: torch.Tensor | None = None
    event: object | None = None
    deferred: tuple[torch.Tensor, list[SamplingInput]] | None = None
    """(logits [N, V], rows) of a step whose sampling waits for its grammar bitmask."""
    prompt_logprobs: dict[str, tuple[int, list[SampledToken]]] = field(default_factory=dict)
    """Already on the host (see ModelRunnerOutput)."""

    def __post_init__(self) -> None:
        if self.sample is not None:
            self.start_copy()

    def start_copy(self) -> None:
        if self.sample.packed.is_cuda:
            # Start the copy to the host now; sampled() waits only for this event.
            self.host = torch.empty(self.sample.packed.shape, dtype=self.sample.packed.dtype, pin_memory=True)
            self.host.copy_(self.sample.packed, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()

    def rows(self) -> dict[str, int]:
        return {request_id: i for i, request_id in enumerate(self.request_ids)}

    def sampled(self) -> SamplerOutput:
        """The sampled tokens on the host, row i that of request_ids[i] (waits for the copy). Kept
        as columns: the engine reads them row by row, and an object per row would cost a call each."""
        if self.sample is None:
            return SamplerOutput(token_ids=[], logprobs=[], top_logprobs=None, ranks=[])
        if self.event is not None:
            self.event.synchronize()
            packed = self.host.tolist()
        else:
            packed = self.sample.packed.tolist()
        return unpack(packed, self.sample.counts)


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    attn: AttentionMetadata
    sample_indices: torch.Tensor
    """Row of each sampling request's last new token in the flat batch, [num_samples]."""
    sample_rows: list[int]
    """The same on the host."""
    arrays: StepArrays
    """The host arrays the device tensors were copied from (what tensor-parallel followers get)."""


@dataclass
class StagedInputs:
    """A step's inputs on the device but for the tokens its previous step still samples."""

    inputs: StepInputs
    fill: torch.Tensor | None
    """Positions in the flat batch of those tokens (PLACEHOLDER on the host)."""
    fill_ids: list[str]
    """The request each of them belongs to (its row in the previous step's samples)."""


@torch.inference_mode()
def run_fake_mixed_step(model: torch.nn.Module, num_tokens: int, block_size: int, device: torch.device) -> torch.Tensor:
    """The largest step the scheduler can issue: a prefill chunk of num_tokens - 1 plus one decode,
    through the model and the LM head; returns the two rows' logits. Slots are -1, so nothing is
    written to the bound KV cache, and every block table entry is 0, so a 1-block cache suffices
    (start-up profiles its peak memory that way, before the pool exists)."""
    width = -(-num_tokens // block_size)
    attn = AttentionMetadata(
        query_start_loc=torch.tensor([0, num_tokens - 1, num_tokens], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([num_tokens - 1, 1], dtype=torch.int32, device=device),
        block_tables=torch.zeros(2, width, dtype=torch.int32, device=device),
        slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=device),
        max_query_len=num_tokens - 1, max_seq_len=num_tokens - 1,
        query_lens_cpu=[num_tokens - 1, 1], seq_lens_cpu=[num_tokens - 1, 1],
    )
    input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
    positions = torch.cat([torch.arange(num_tokens - 1, device=device), torch.zeros(1, dtype=torch.int64, device=device)])
    hidden = model(input_ids, positions, attn)
    return model.compute_logits(hidden[-2:])


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], block_size: int, device: torch.device,
                 graphs: DecodeGraphs | None = None, warmup_tokens: int = 0,
                 followers: NoFollowers = NO_FOLLOWERS) -> None:
        """`kv_caches`: the one pool, or one per KV layer group (followers only with one pool)."""
        self.model = model
        self.followers = followers
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.sampler = Sampler()
        self.generators: dict[str, torch.Generator] = {}
        self._rows: dict[str, SamplingInput] = {}
        model.bind_kv_cache(kv_caches[0] if len(kv_caches) == 1 else kv_caches)
        followers.bind_kv(kv_caches[0].shape[0], block_size)
        # Two sets of pinned staging buffers, used by alternate steps: with async scheduling step
        # N+1 is prepared while step N may still be queued on the GPU behind N-1, so its copies out
        # of a buffer are not known to be done when the next step wants it. Each set's copies end
        # in an event that its next user waits for (two steps later: in practice long complete).
        self._pinned: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] = ({}, {})
        self._staged: list[torch.cuda.Event | None] = [None, None]
        self._slot = 0
        self.graphs = graphs
        if warmup_tokens > 1:
            self.warmup(warmup_tokens)
        if graphs is not None:
            followers.capture_graphs(graphs.sizes[-1], graphs.max_model_len, block_size)
            graphs.capture()

    @torch.inference_mode()
    def warmup(self, num_tokens: int) -> None:
        """Run one fake mixed step so every kernel is compiled before the first request."""
        self.followers.fake_step(num_tokens, self.block_size)
        logits = run_fake_mixed_step(self.model, num_tokens, self.block_size, self.device)
        from splitserve.shared.sampling_params import SamplingParams

        rows = [SamplingInput(SamplingParams(temperature=0.0), [0], [], None)] * 2
        self.sampler(logits, rows)
        # The grammar bitmask kernel too (Triton), so the first structured request does not compile it.
        allowed = torch.full((2, bitmask_width(logits.shape[1])), -1, dtype=torch.int32)
        self.sampler(logits, rows, (allowed, [0, 1]))

    def add_generator(self, request_id: str, seed: int) -> None:
        self.generators[request_id] = torch.Generator(device=self.device).manual_seed(seed)

    def drop_request(self, request_id: str) -> None:
        self.generators.pop(request_id, None)
        self._rows.pop(request_id, None)

    def _sampling_inputs(self, requests: list[Request]) -> list[SamplingInput]:
        """Each request's SamplingInput, built on its first sampling step and kept until
        drop_request: it holds the request's live token lists, so it stays current, and a decode
        step builds no object per request. (A row of another request of the same id, which
        drop_request should have removed, is told apart by its output list.)"""
        rows = self._rows
        for r in [r for r in requests if r.request_id not in rows or rows[r.request_id].output_token_ids
                  is not r.output_token_ids]:
            rows[r.request_id] = SamplingInput(r.sampling_params, r.prompt_token_ids, r.output_token_ids,
                                               self.generators.get(r.request_id), r.eos_token_ids)
        return [rows[r.request_id] for r in requests]

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, block_tables: list[np.ndarray],
                bitmask: Bitmask | None = None) -> ModelRunnerOutput:
        """Run one step and wait for its tokens."""
        pending = self.execute_async(sched, block_tables, defer_sampling=True)
        self.sample(pending, bitmask)
        return ModelRunnerOutput(pending.sampled(), pending.prompt_logprobs)

    @torch.inference_mode()
    def sample(self, pending: PendingStep, bitmask: Bitmask | None) -> None:
        """Sample a step launched with `defer_sampling`, under its grammar bitmask."""
        if pending.deferred is not None:
            logits, rows = pending.deferred
            pending.deferred = None
            pending.sample = self.sampler.sample(logits, rows, bitmask)
            pending.start_copy()

    @torch.inference_mode()
    def execute_async(self, sched: SchedulerOutput, block_tables: list[np.ndarray],
                      previous: PendingStep | None = None, defer_sampling: bool = False,
                      staged: StagedInputs | None = None) -> PendingStep:
        """Launch one step without waiting for it. Input tokens not known on the host yet
        (PLACEHOLDER, sampled by `previous`, still in flight) are taken from its device tensor.
        With `defer_sampling` only the forward is launched: `sample` finishes the step once the
        grammar bitmask (which needs the previous step's tokens) is known. `staged`: this step's
        inputs from `stage_inputs`, made before `previous` was sampled."""
        if sched.is_empty:
            return PendingStep([], None)
        inputs = self.fill_placeholders(staged or self.stage_inputs(sched, block_tables), previous)
        hidden = self._forward(inputs)  # [T, H]
        wanted = prompt_rows(sched)
        prompt_logprobs = compute_prompt_logprobs(self._prompt_logits(hidden), wanted) if wanted else {}
        sampling = [s.request for s in sched.scheduled if s.samples]
        if not sampling:
            return PendingStep([], None, prompt_logprobs=prompt_logprobs)
        self.followers.logits(inputs.sample_rows)
        logits = self.model.compute_logits(hidden[inputs.sample_indices])  # [N, V]
        rows = self._sampling_inputs(sampling)
        request_ids = [r.request_id for r in sampling]
        if defer_sampling:
            deferred = (logits, as_of_now(rows))
            return PendingStep(request_ids, None, deferred=deferred, prompt_logprobs=prompt_logprobs)
        return PendingStep(request_ids, self.sampler.sample(logits, rows), prompt_logprobs=prompt_logprobs)

    def _prompt_logits(self, hidden: torch.Tensor):
        """rows -> their logits [R, V] (followers compute their shard of the same rows)."""
        def logits_of(rows: list[int]) -> torch.Tensor:
            self.followers.logits(rows)
            return self.model.compute_logits(hidden[rows])

        return logits_of

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        attn = inputs.attn
        num_tokens = inputs.input_ids.shape[0]
        decode_only = attn.max_query_len == 1 and num_tokens == len(attn.seq_lens_cpu)
        graph = self.graphs is not None and decode_only and self.graphs.bucket(num_tokens) is not None
        self.followers.forward(inputs.arrays, graph)
        if graph:
            return self.graphs.run(inputs.input_ids, inputs.positions, attn)
        return self.model(inputs.input_ids, inputs.positions, attn)

    @torch.inference_mode()
    def prepare_inputs(self, sched: SchedulerOutput, block_tables: list[np.ndarray],
                       previous: PendingStep | None = None) -> StepInputs:
        return self.fill_placeholders(self.stage_inputs(sched, block_tables), previous)

    @torch.inference_mode()
    def stage_inputs(self, sched: SchedulerOutput, block_tables: list[np.ndarray]) -> StagedInputs:
        """A step's inputs, copied to the device, except the tokens the previous step has not
        sampled yet (`fill_placeholders`). Vectorised with numpy: a decode step of hundreds of
        requests must cost well under a ms. `block_tables[g]` [B, width] int32 holds the scheduled
        requests' tables of KV layer group g (one entry: one pool) in scheduled order."""
        if self.device.type == "cuda":
            self._slot ^= 1
            if self._staged[self._slot] is not None:
                self._staged[self._slot].synchronize()
        bs = self.block_size
        reqs = [s.request for s in sched.scheduled]
        num_reqs = len(reqs)
        query_lens = np.array([s.num_new_tokens for s in sched.scheduled], np.int64)
        starts = np.array([r.num_computed_tokens for r in reqs], np.int64)
        seq_lens = starts + query_lens
        query_start = np.zeros(num_reqs + 1, np.int64)
        np.cumsum(query_lens, out=query_start[1:])
        num_tokens = int(query_start[-1])
        row_of_token = np.repeat(np.arange(num_reqs), query_lens)  # [T]
        positions = np.arange(num_tokens) + (starts - query_start[:-1])[row_of_token]
        if num_tokens == num_reqs:  # decode: one token each, no slicing
            input_ids = np.array([r.all_token_ids[r.num_computed_tokens] for r in reqs], np.int64)
        else:
            input_ids = np.fromiter(itertools.chain.from_iterable(
                [r.all_token_ids[a:b] for r, a, b in zip(reqs, starts.tolist(), seq_lens.tolist())]), np.int64, num_tokens)
        group_slots = [t[row_of_token, positions // bs].astype(np.int64) * bs + positions % bs for t in block_tables]
        slots = group_slots[0]
        samples = np.array([s.samples for s in sched.scheduled], bool)
        sample_indices = query_start[1:][samples] - 1
        arrays = StepArrays(input_ids, positions, query_start.astype(np.int32), seq_lens.astype(np.int32),
                            block_tables[0], slots, query_lens.tolist(), seq_lens.tolist())
        tables = [(self._to_device(f"block_tables{g}", t), self._to_device(f"slot_mapping{g}", s))
                  for g, (t, s) in enumerate(zip(block_tables, group_slots))]
        attn = AttentionMetadata(
            query_start_loc=self._to_device("query_start_loc", arrays.query_start_loc),
            seq_lens=self._to_device("seq_lens", arrays.seq_lens),
            block_tables=tables[0][0],
            slot_mapping=tables[0][1],
            max_query_len=max(arrays.query_lens_cpu),
            max_seq_len=max(arrays.seq_lens_cpu),
            query_lens_cpu=arrays.query_lens_cpu,
            seq_lens_cpu=arrays.seq_lens_cpu,
            group_tables=tuple(tables) if len(tables) > 1 else (),
        )
        device_ids = self._to_device("input_ids", input_ids)
        fill = np.flatnonzero(input_ids == PLACEHOLDER)
        fill_ids = [reqs[r].request_id for r in row_of_token[fill].tolist()]
        fill_device = self._to_device("fill", fill) if fill.size else None
        inputs = StepInputs(
            input_ids=device_ids,
            positions=self._to_device("positions", positions),
            attn=attn,
            sample_indices=self._to_device("sample_indices", sample_indices),
            sample_rows=sample_indices.tolist(),
            arrays=arrays,
        )
        return StagedInputs(inputs, fill_device, fill_ids)

    def fill_placeholders(self, staged: StagedInputs, previous: PendingStep | None) -> StepInputs:
        """The staged step's inputs, with its tokens still on the device (`previous`'s samples)
        gathered into place: after `previous` is sampled, before this step's forward."""
        if staged.fill_ids:
            rows = previous.rows() if previous is not None else {}
            source = self._to_device("source", np.array([rows[rid] for rid in staged.fill_ids]))
            staged.inputs.input_ids[staged.fill] = previous.sample.token_ids[source]
        if self.device.type == "cuda":
            self._staged[self._slot] = torch.cuda.Event()
            self._staged[self._slot].record()  # after this step's last copy out of the set
        return staged.inputs

    def _to_device(self, name: str, array: np.ndarray) -> torch.Tensor:
        """Host array -> device tensor; on CUDA through a reused pinned buffer of this step's set
        (see `__init__`), copied asynchronously."""
        host = torch.from_numpy(array)
        if self.device.type != "cuda":
            return host
        flat = host.reshape(-1)
        pinned = self._pinned[self._slot]
        buf = pinned.get(name)
        if buf is None or buf.dtype != flat.dtype or buf.numel() < flat.numel():
            buf = pinned[name] = torch.empty(max(flat.numel(), 1024), dtype=flat.dtype, pin_memory=True)
        staged = buf[: flat.numel()]
        staged.copy_(flat)
        return staged.view(host.shape).to(self.device, non_blocking=True)
