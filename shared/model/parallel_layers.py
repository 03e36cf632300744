"""Tensor-parallel building blocks: each rank holds a slice of every large matrix (Megatron-style).

    x ─▶ column-parallel (q/k/v, gate/up; output rows split) ─▶ per-rank heads / intermediate
      ─▶ row-parallel (o_proj, down_proj; input columns split) ─▶ all_reduce ─▶ + bias ─▶ replicated x

The embedding and the LM head split the vocabulary into one contiguous range per rank (the last
padded); the embedding all-reduces its masked lookups, the head all-gathers the logits. Norms,
rotary tables and routers are replicated. Each module slices the full Hugging Face tensor for its
rank in `load_shard`, so checkpoints load unchanged at any size. With one rank (the default)
every slice is the whole tensor and every collective returns its input.

Heads: rank r computes q heads [r*Hq/N, (r+1)*Hq/N). With Hkv >= N it holds kv heads
[r*Hkv/N, (r+1)*Hkv/N); with Hkv < N (N a multiple of Hkv) it holds the one kv head its q heads
read, r*Hkv // N, so each kv head is replicated on N/Hkv ranks (as vLLM does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.kernels import ops
from splitserve.shared.parallel import state


class TensorParallelError(ValueError):
    """The model cannot be split over this many ranks; the message says why."""


@dataclass(frozen=True)
class RowSlice:
    """The rows [start, start + size) of a checkpoint matrix of `full` rows that this rank holds."""

    full: int
    start: int
    size: int


def even_slice(full: int, what: str) -> RowSlice:
    """This rank's equal share of `full` rows (or columns)."""
    n = state.world_size()
    if full % n:
        raise TensorParallelError(f"{what} {full} is not divisible by tensor_parallel_size {n}")
    size = full // n
    return RowSlice(full, state.rank() * size, size)


def check_head_split(num_heads: int, num_kv_heads: int, n: int) -> None:
    """Refuse head counts that do not split over `n` ranks (as vLLM does)."""
    if num_heads % n:
        raise TensorParallelError(
            f"the model's {num_heads} attention heads are not divisible by tensor_parallel_size {n}")
    if num_kv_heads % n and n % num_kv_heads:
        raise TensorParallelError(
            f"the model's {num_kv_heads} key/value heads and tensor_parallel_size {n} do not divide one another")


def kv_heads_per_rank(num_kv_heads: int, n: int) -> int:
    """kv heads each rank holds: an equal share, or one replicated head when there are fewer than ranks."""
    return max(1, num_kv_heads // n)


def kv_head_slice(num_kv_heads: int, head_dim: int) -> RowSlice:
    """This rank's rows of a k or v projection (whole heads; see the module docstring)."""
    n = state.world_size()
    first = state.rank() * num_kv_heads // n
    return RowSlice(num_kv_heads * head_dim, first * head_dim, kv_heads_per_rank(num_kv_heads, n) * head_dim)


def kv_replicas(num_kv_heads: int) -> int:
    """On how many ranks each kv head lives."""
    return max(1, state.world_size() // num_kv_heads)


def _copy_checked(target: torch.Tensor, tensor: torch.Tensor, what: str) -> None:
    if target.shape != tensor.shape:
        raise ValueError(f"{what}: expected shape {tuple(target.shape)}, got {tuple(tensor.shape)}")
    target.copy_(tensor)


class MergedColumnParallelLinear(nn.Module):
    """Several stacked projections (q/k/v, gate/up) in one GEMM: `slices` name, in order, each
    checkpoint matrix's rows this rank holds. The output stays sharded (this rank's heads)."""

    def __init__(self, in_features: int, slices: dict[str, RowSlice], bias: bool) -> None:
        super().__init__()
        self.slices = slices
        self.offsets: dict[str, int] = {}
        offset = 0
        for name, piece in slices.items():
            self.offsets[name] = offset
            offset += piece.size
        self.weight = nn.Parameter(torch.empty(offset, in_features))
        self.bias = nn.Parameter(torch.empty(offset)) if bias else None

    def shards(self, param_name: str) -> list[str]:
        return list(self.slices)

    def load_shard(self, param_name: str, shard: str | None, tensor: torch.Tensor) -> None:
        """One checkpoint matrix (or bias) into its rows; `shard` None: a checkpoint that fuses them
        all (Phi-3's qkv_proj / gate_up_proj), split by their full sizes."""
        if shard is None:
            fulls = [piece.full for piece in self.slices.values()]
            if tensor.shape[0] != sum(fulls):
                raise ValueError(f"fused {param_name} has {tensor.shape[0]} rows, expected {sum(fulls)}")
            for name, part in zip(self.slices, tensor.split(fulls)):
                self.load_shard(param_name, name, part)
            return
        piece = self.slices[shard]
        if tensor.shape[0] != piece.full:
            raise ValueError(f"shard {shard!r} of {param_name}: expected {piece.full} rows, got {tensor.shape[0]}")
        target = getattr(self, param_name).data.narrow(0, self.offsets[shard], piece.size)
        _copy_checked(target, tensor.narrow(0, piece.start, piece.size), f"shard {shard!r} of {param_name}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """`y = x W^T + b` with W's input columns split over the ranks: each rank multiplies its slice
    of `x` (its heads, its intermediate channels), the partial sums are all-reduced, the bias added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool, what: str) -> None:
        super().__init__()
        self.columns = even_slice(in_features, what)
        self.weight = nn.Parameter(torch.empty(out_features, self.columns.size))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def load_shard(self, param_name: str, shard: None, tensor: torch.Tensor) -> None:
        if param_name == "weight":
            if tensor.dim() != 2 or tensor.shape[1] != self.columns.full:
                raise ValueError(f"expected {self.columns.full} input columns, got shape {tuple(tensor.shape)}")
            tensor = tensor.narrow(1, self.columns.start, self.columns.size)
        _copy_checked(getattr(self, param_name).data, tensor, param_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = state.all_reduce(ops.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


def vocab_slice(vocab_size: int) -> RowSlice:
    """This rank's contiguous vocabulary range, ceil(V / N) rows each (the last rank's may run past
    V: those padding rows stay zero and are cut from the gathered logits)."""
    per_rank = -(-vocab_size // state.world_size())
    return RowSlice(vocab_size, state.rank() * per_rank, per_rank)


def _load_vocab_rows(weight: torch.Tensor, rows: RowSlice, tensor: torch.Tensor) -> None:
    if tensor.shape[0] != rows.full or tensor.shape[1:] != weight.shape[1:]:
        raise ValueError(f"expected shape {(rows.full, *weight.shape[1:])}, got {tuple(tensor.shape)}")
    present = max(0, min(rows.size, rows.full - rows.start))
    weight.data.zero_()
    weight.data[:present].copy_(tensor.narrow(0, rows.start, present))


class _VocabRows(nn.Module):
    """A `[vocab, hidden]` weight of which this rank holds its contiguous range of rows."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.rows = vocab_slice(vocab_size)
        self.weight = nn.Parameter(torch.empty(self.rows.size, hidden_size))

    def load_shard(self, param_name: str, shard: None, tensor: torch.Tensor) -> None:
        _load_vocab_rows(self.weight, self.rows, tensor)


class VocabParallelEmbedding(_VocabRows):
    """Token embedding with the vocabulary split over the ranks: a rank looks up the ids in its
    range, zeroes the others, and the all-reduce assembles every row."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if state.world_size() == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.rows.start
        outside = (local < 0) | (local >= self.rows.size)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return state.all_reduce(out.masked_fill(outside[:, None], 0.0))


class ParallelLMHead(_VocabRows):
    """The output projection, vocabulary split like `VocabParallelEmbedding` (so a tied head
    shares its weight); `forward` returns the full logits on every rank, all-gathered."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = state.all_gather(ops.linear(hidden, self.weight), dim=-1)  # [N, ranks * per_rank]
        return logits if logits.shape[-1] == self.rows.full else logits[:, : self.rows.full]


class ShardedRMSNorm(nn.Module):
    """RMSNorm over a whole projection whose channels are split over the ranks (OLMo 2's q/k norm):
    the sum of squares is all-reduced (divided by `replicas` when each channel lives on that many
    ranks, replicated kv heads) so every rank normalises by the full projection's RMS."""

    def __init__(self, channels: RowSlice, eps: float, replicas: int = 1) -> None:
        super().__init__()
        self.channels, self.eps, self.replicas = channels, eps, replicas
        self.weight = nn.Parameter(torch.ones(channels.size))

    def load_shard(self, param_name: str, shard: None, tensor: torch.Tensor) -> None:
        if tensor.shape != (self.channels.full,):
            raise ValueError(f"expected shape ({self.channels.full},), got {tuple(tensor.shape)}")
        self.weight.data.copy_(tensor.narrow(0, self.channels.start, self.channels.size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if state.world_size() == 1:
            return ops.rms_norm(x, self.weight, self.eps)
        x32 = x.float()
        square_sum = state.all_reduce(x32.pow(2).sum(-1, keepdim=True)) / self.replicas
        normed = x32 * torch.rsqrt(square_sum / self.channels.full + self.eps)
        return (self.weight * normed.to(x.dtype)).to(x.dtype)
