"""KV transfer settings (torch-free, so CLI parsers and the gateway can import it).

Written by the lead so services can generate their `--transfer-*` flags; the transfer
package's connector consumes it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TransferConfig:
    backend: str = "ucx"
    """Data path of KV blocks: 'ucx' (ucxx: TCP on CPU, CUDA IPC/NVLink/RDMA on GPUs) or 'nccl'."""
    host: str = "127.0.0.1"
    """Address this worker's transfer endpoints (ZMQ control, UCX listener) bind and advertise."""
    control_port: int = 0
    """ZMQ control port; 0 picks a free one."""
    timeout_s: float = 10.0
    """A KV load not complete by then fails, and the decode side recomputes the prompt."""
    lease_s: float = 30.0
    """Prefill side: held blocks are released if no decode side confirms within this time."""
    role: str = "prefill"
    """'prefill' (holds and sends) or 'decode' (receives); set by the service, not a flag."""
    layout_hash: str = ""
    """Compatibility hash of model, dtype, block size and layout; set by the service."""

    def validate(self) -> None:
        if self.backend not in ("ucx", "nccl"):
            raise ValueError(f"transfer backend must be 'ucx' or 'nccl', got {self.backend!r}")
        if self.role not in ("prefill", "decode"):
            raise ValueError(f"transfer role must be 'prefill' or 'decode', got {self.role!r}")
        if self.timeout_s <= 0 or self.lease_s <= 0:
            raise ValueError("transfer timeout_s and lease_s must be positive")
