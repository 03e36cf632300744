"""The one owner of the tensor-parallel process group: init, rank and size, collectives, teardown.

    store = rendezvous(world_size)                       # rank 0: a TCP store on 127.0.0.1, any port
    store = rendezvous(world_size, store.port)           # a follower: connect to it
    init_process_group(rank, world_size, store, device)  # gloo on CPU, NCCL on CUDA
    rank(), world_size()
    all_reduce(x)            # in place, sum over the ranks
    all_gather(x, dim)       # concatenated along `dim`, in rank order
    gather_to_rank0(x)       # rank 0: every rank's x in rank order; the others: None
    scatter_from_rank0(out, parts)  # rank r receives rank 0's parts[r] into out
    destroy()

A process holds at most one group (torch.distributed's default group). Without one (a single
rank, the default), `rank()` is 0, `world_size()` 1 and the collectives return their input: the
model layers call them unconditionally. No other module calls torch.distributed.

Every collective runs under the group's `timeout`, so a rank that died or hangs ends the others'
wait with `ParallelError` instead of blocking forever.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT_S = 120.0
"""How long any collective (and the rendezvous) may wait for the other ranks."""


class ParallelError(RuntimeError):
    """A collective failed or timed out: a rank is gone and the worker cannot go on."""


@dataclass(frozen=True)
class ParallelState:
    rank: int = 0
    world_size: int = 1


_state = ParallelState()


def rendezvous(world_size: int, port: int | None = None, timeout_s: float = COLLECTIVE_TIMEOUT_S) -> dist.Store:
    """Rank 0 (`port` None) serves the group's store on 127.0.0.1 at a free port (`.port`); the
    others connect to that port. Loopback only: the ranks of one worker share a host."""
    try:
        return dist.TCPStore("127.0.0.1", port or 0, world_size, is_master=port is None,
                             timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
    except RuntimeError as exc:
        raise ParallelError(f"cannot reach the tensor-parallel store on 127.0.0.1:{port}: {exc}") from exc


def joining_key(rank: int) -> str:
    """The store key a follower sets once it reached the store (rank 0 watches for it)."""
    return f"splitserve/joining/{rank}"


def init_process_group(rank: int, world_size: int, store: dist.Store, device: torch.device,
                       timeout_s: float = COLLECTIVE_TIMEOUT_S) -> None:
    """Join the group of `world_size` ranks meeting at `store`; waits at most `timeout_s` for them."""
    global _state
    if _state.world_size > 1:
        raise ParallelError("this process already belongs to a tensor-parallel group; close that engine first")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda" and device.index is None:  # NCCL binds one device: name it
        device = torch.device("cuda", torch.cuda.current_device())
    if rank:
        store.set(joining_key(rank), "1")
    try:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s),
                                **({"device_id": device} if device.type == "cuda" else {}))
    except (RuntimeError, ValueError) as exc:
        raise ParallelError(f"rank {rank} of {world_size} could not join the process group: {exc}") from exc
    _state = ParallelState(rank, world_size)


def rank() -> int:
    return _state.rank


def world_size() -> int:
    return _state.world_size


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the ranks, in place; returns it."""
    if _state.world_size == 1:
        return x
    try:
        dist.all_reduce(x)
    except RuntimeError as exc:
        raise ParallelError(f"all_reduce failed on rank {_state.rank}: {exc}") from exc
    return x


def all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Every rank's `x` (equal shapes), concatenated along `dim` in rank order."""
    if _state.world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_state.world_size)]
    try:
        dist.all_gather(parts, x.contiguous())
    except RuntimeError as exc:
        raise ParallelError(f"all_gather failed on rank {_state.rank}: {exc}") from exc
    return torch.cat(parts, dim=dim)


def gather_to_rank0(x: torch.Tensor) -> list[torch.Tensor] | None:
    """Rank 0: every rank's `x` (equal shapes) in rank order; the other ranks: None."""
    if _state.world_size == 1:
        return [x]
    parts = [torch.empty_like(x) for _ in range(_state.world_size)] if _state.rank == 0 else None
    try:
        dist.gather(x.contiguous(), parts, dst=0)
    except RuntimeError as exc:
        raise ParallelError(f"gather failed on rank {_state.rank}: {exc}") from exc
    return parts


def scatter_from_rank0(out: torch.Tensor, parts: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Rank r receives rank 0's `parts[r]` (equal shapes, rank 0 alone passes them) into `out`."""
    if _state.world_size == 1:
        return out.copy_(parts[0])
    try:
        dist.scatter(out, [p.contiguous() for p in parts] if _state.rank == 0 else None, src=0)
    except RuntimeError as exc:
        raise ParallelError(f"scatter failed on rank {_state.rank}: {exc}") from exc
    return out


def destroy() -> None:
    """Leave the group (a no-op without one)."""
    global _state
    if _state.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
    _state = ParallelState()
