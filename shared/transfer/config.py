"""`TransferConfig`: everything one KV connector needs to know, in one frozen dataclass."""

from __future__ import annotations

from dataclasses import dataclass

BACKENDS = ("ucx", "nccl")
ROLES = ("prefill", "decode", "both")


@dataclass(frozen=True)
class TransferConfig:
    role: str = "both"
    """'prefill' (holds and sends), 'decode' (loads) or 'both' (a colocated worker)."""
    backend: str = "ucx"
    """Data plane: 'ucx' (ucxx; TCP on CPU, cuda_ipc/rc on GPUs) or 'nccl' (torch.distributed
    point-to-point; gloo on CPU tensors, nccl on CUDA tensors)."""
    host: str = "127.0.0.1"
    """Address this connector binds (ZMQ control socket; UCX's transports listen on the network
    device holding it) and advertises."""
    control_port: int = 0
    """Port of the prefill side's ZMQ ROUTER; 0 picks a free one."""
    trusted_prefills: tuple[str, ...] = ()
    """Decode side: prefill control addresses (`host:port`, or `host` for any port) a KV handle
    may name; empty: any handle from an authenticated gateway."""
    timeout_s: float = 10.0
    """A load not complete by then fails (the decode side recomputes)."""
    lease_s: float = 30.0
    """Prefill side: held blocks are released if no decode side asks for them by then. A load
    request extends the lease to cover the transfer (timeout_s) plus lease_s."""
    model_id: str = ""
    """Part of the layout hash (see handle.layout_hash)."""
    layout_hash: str = ""
    """Overrides the hash computed from model_id and the kv_cache's shape and dtype."""
    ucx_tls: str | None = None
    """UCX transports (UCX_TLS). None keeps UCX's own choice (or the UCX_TLS environment).
    CPU test machines: 'tcp'. GPU nodes: 'cuda_copy,cuda_ipc,rc,tcp' (NVLink via cuda_ipc
    within a node, InfiniBand/RoCE via rc across nodes, tcp as the last resort)."""
    nccl_init_method: str = ""
    """nccl backend: 'tcp://host:port' of the TCPStore both ranks rendezvous at (rank 0 hosts it)."""
    nccl_rank: int = -1
    """nccl backend: this process's rank in the two-rank transfer group."""
    nccl_world_size: int = 2
    """nccl backend: only 2 (one prefill rank, one decode rank) is supported."""

    def validate(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"TransferConfig.role must be one of {ROLES}, got {self.role!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"TransferConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.timeout_s <= 0 or self.lease_s <= 0:
            raise ValueError(f"TransferConfig timeout_s and lease_s must be positive, got "
                             f"{self.timeout_s}, {self.lease_s}")
        if self.backend == "nccl":
            if not self.nccl_init_method.startswith("tcp://"):
                raise ValueError(f"TransferConfig.nccl_init_method must be tcp://host:port, "
                                 f"got {self.nccl_init_method!r}")
            if self.nccl_world_size != 2 or self.nccl_rank not in (0, 1):
                raise ValueError(f"TransferConfig nccl backend needs world_size 2 and rank 0 or 1, "
                                 f"got {self.nccl_world_size}, {self.nccl_rank}")
            if self.role == "both":
                raise ValueError("TransferConfig: the nccl backend needs role 'prefill' or 'decode'")
