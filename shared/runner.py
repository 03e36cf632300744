"""Model runner: turns a `SchedulerOutput` into tensors, runs the model, samples.

Mechanism only: the scheduler decided what runs; this builds, for the flat batch of T new
tokens across B requests,

    input_ids [T], positions [T], slot_mapping [T]          (one entry per new token)
    query_start_loc [B+1], seq_lens [B], block_tables [B, max_blocks]   (one row per request)

runs `model.forward`, takes the hidden state of the last new token of every request that has
caught up with its known tokens, and samples one token for each of those.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitserve.shared.cuda_graphs import DecodeGraphs
from splitserve.shared.model.attention import AttentionMetadata
from splitserve.shared.sampler import Sampler, SamplingInput
from splitserve.shared.scheduler import SchedulerOutput


@dataclass
class SampledToken:
    token_id: int
    logprob: float
    rank: int
    top_logprobs: list[tuple[int, float]]


@dataclass
class ModelRunnerOutput:
    sampled: dict[str, SampledToken]
    """Request id -> the token sampled for it this step (only requests that caught up)."""


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    attn: AttentionMetadata
    sample_indices: torch.Tensor
    """Row of each sampling request's last new token in the flat batch, [num_samples]."""


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_cache: torch.Tensor, block_size: int, device: torch.device,
                 graphs: DecodeGraphs | None = None) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = device
        self.sampler = Sampler()
        self.generators: dict[str, torch.Generator] = {}
        model.bind_kv_cache(kv_cache)
        self.graphs = graphs
        if graphs is not None:
            graphs.capture()

    def add_generator(self, request_id: str, seed: int) -> None:
        self.generators[request_id] = torch.Generator(device=self.device).manual_seed(seed)

    def drop_request(self, request_id: str) -> None:
        self.generators.pop(request_id, None)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, block_tables: dict[str, list[int]]) -> ModelRunnerOutput:
        if sched.is_empty:
            return ModelRunnerOutput({})
        inputs = self.prepare_inputs(sched, block_tables)
        hidden = self._forward(inputs)  # [T, H]
        sampling = [s.request for s in sched.scheduled if s.samples]
        if not sampling:
            return ModelRunnerOutput({})
        logits = self.model.compute_logits(hidden[inputs.sample_indices])  # [N, V] fp32
        rows = [
            SamplingInput(
                params=r.sampling_params,
                prompt_token_ids=r.prompt_token_ids,
                output_token_ids=r.output_token_ids,
                generator=self.generators.get(r.request_id),
                eos_token_ids=r.eos_token_ids,
            )
            for r in sampling
        ]
        out = self.sampler(logits, rows)
        top = out.top_logprobs or [[] for _ in sampling]
        return ModelRunnerOutput({
            r.request_id: SampledToken(out.token_ids[i], out.logprobs[i], out.ranks[i], top[i])
            for i, r in enumerate(sampling)
        })

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        attn = inputs.attn
        num_tokens = inputs.input_ids.shape[0]
        decode_only = attn.max_query_len == 1 and num_tokens == len(attn.seq_lens_cpu)
        if self.graphs is not None and decode_only and self.graphs.bucket(num_tokens) is not None:
            return self.graphs.run(inputs.input_ids, inputs.positions, attn)
        return self.model(inputs.input_ids, inputs.positions, attn)

    def prepare_inputs(self, sched: SchedulerOutput, block_tables: dict[str, list[int]]) -> StepInputs:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        sample_indices: list[int] = []
        for s in sched.scheduled:
            req, start = s.request, s.request.num_computed_tokens
            stop = start + s.num_new_tokens
            table = block_tables[req.request_id]
            input_ids += req.token_ids_slice(start, stop)
            positions += range(start, stop)
            slots += [table[p // bs] * bs + p % bs for p in range(start, stop)]
            query_lens.append(s.num_new_tokens)
            seq_lens.append(stop)
            tables.append(table)
            if s.samples:
                sample_indices.append(len(input_ids) - 1)
        max_blocks = max(len(t) for t in tables)
        padded = [t + [0] * (max_blocks - len(t)) for t in tables]
        query_start = [0]
        for q in query_lens:
            query_start.append(query_start[-1] + q)

        def tensor(values, dtype):
            return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

        attn = AttentionMetadata(
            query_start_loc=tensor(query_start, torch.int32),
            seq_lens=tensor(seq_lens, torch.int32),
            block_tables=tensor(padded, torch.int32),
            slot_mapping=tensor(slots, torch.int64),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
        )
        return StepInputs(
            input_ids=tensor(input_ids, torch.int64),
            positions=tensor(positions, torch.int64),
            attn=attn,
            sample_indices=tensor(sample_indices, torch.int64),
        )
