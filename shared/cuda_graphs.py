"""CUDA graphs of the model's forward for decode steps (one new token per request).

A decode step launches a few hundred small kernels; replaying a captured graph removes the
per-launch CPU cost. One graph per batch-size bucket (1, 2, 4, 8, then multiples of 16); a
batch is padded up to its bucket. All graphs read their inputs from the same static buffers:

    input_ids [S], positions [S], slot_mapping [S]     pad rows: token 0, position 0, slot -1 (no write)
    query_start_loc [S+1] = 0..S (one token each)       fixed at capture
    seq_lens [S]                                        pad rows: 1 (they read one slot of block 0)
    block_tables [S, max_blocks_per_seq]                only the first cdiv(seq_len, block) columns are read
    group_tables                                        a pool split by KV layer group: each other
                                                        group's block_tables and slot_mapping, as above

The attention kernel's launch shape is fixed per graph: capture passes `max_seq_len =
max_model_len` so the split-KV choice covers every context the graph will see (the kernel
reads the real lengths from `seq_lens` on the device).
"""

from __future__ import annotations

import logging
import time

import torch

from splitserve.shared.model.attention import AttentionMetadata

logger = logging.getLogger(__name__)


def bucket_sizes(max_batch: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s <= max_batch]
    sizes += list(range(16, max_batch + 1, 16))
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, max_batch: int, max_model_len: int, block_size: int,
                 device: torch.device, num_kv_groups: int = 1) -> None:
        """`num_kv_groups` > 1: the pool is split by KV layer group, each with its own block tables
        and slot mapping (static copies of each are kept)."""
        self.model = model
        self.sizes = bucket_sizes(max_batch)
        self.max_model_len = max_model_len
        size = self.sizes[-1]
        max_blocks = -(-max_model_len // block_size)
        self.input_ids = torch.zeros(size, dtype=torch.int64, device=device)
        self.positions = torch.zeros(size, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((size,), -1, dtype=torch.int64, device=device)
        self.query_start_loc = torch.arange(size + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(size, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(size, max_blocks, dtype=torch.int32, device=device)
        self.group_tables = tuple(
            (torch.zeros(size, max_blocks, dtype=torch.int32, device=device),
             torch.full((size,), -1, dtype=torch.int64, device=device)) for _ in range(num_kv_groups - 1))
        """Groups 1.. (group 0's are block_tables and slot_mapping)."""
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def bucket(self, batch: int) -> int | None:
        for size in self.sizes:
            if size >= batch:
                return size
        return None

    def _metadata(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: size + 1], seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size], slot_mapping=self.slot_mapping[:size],
            max_query_len=1, max_seq_len=self.max_model_len,
            query_lens_cpu=[1] * size, seq_lens_cpu=[1] * size,
            group_tables=((self.block_tables[:size], self.slot_mapping[:size]),
                          *((t[:size], m[:size]) for t, m in self.group_tables)) if self.group_tables else (),
        )

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):  # largest first: later graphs reuse its memory
            meta = self._metadata(size)
            for _ in range(2):  # compile Triton kernels, warm cuBLAS outside the capture
                self.model(self.input_ids[:size], self.positions[:size], meta)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self.model(self.input_ids[:size], self.positions[:size], meta)
            self.graphs[size] = (graph, hidden)
        torch.cuda.synchronize()
        logger.info("captured %d decode CUDA graphs (batch %d..%d) in %.1f s", len(self.graphs),
                    self.sizes[0], self.sizes[-1], time.perf_counter() - start)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        """Replay the graph of the batch's bucket; returns hidden states [batch, H] (a view)."""
        batch = input_ids.shape[0]
        size = self.bucket(batch)
        width = attn.block_tables.shape[1]
        self.input_ids[:batch].copy_(input_ids, non_blocking=True)
        self.positions[:batch].copy_(positions, non_blocking=True)
        self.slot_mapping[:batch].copy_(attn.slot_mapping, non_blocking=True)
        self.seq_lens[:batch].copy_(attn.seq_lens, non_blocking=True)
        self.block_tables[:batch, :width].copy_(attn.block_tables, non_blocking=True)
        for (tables, slots), (step_tables, step_slots) in zip(self.group_tables, attn.group_tables[1:]):
            tables[:batch, : step_tables.shape[1]].copy_(step_tables, non_blocking=True)
            slots[:batch].copy_(step_slots, non_blocking=True)
            if size > batch:
                slots[batch:size].fill_(-1)
        if size > batch:
            self.slot_mapping[batch:size].fill_(-1)
            self.seq_lens[batch:size].fill_(1)
        graph, hidden = self.graphs[size]
        graph.replay()
        return hidden[:batch]
