"""`KvHandle`: what a prefill engine hands out for a request whose KV it holds.

The handle travels prefill -> gateway (gRPC) -> decode as a plain dict. It names the prefill
process (`instance_id`, a uuid4 drawn at every process start, so a restarted peer on the same
address is a *new* peer), the blocks, and a layout hash that both sides must share before any
byte moves. Standard library only: the gateway imports this module and no torch.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

KV_HANDLE_VERSION = 1
KV_LAYOUT_NAME = "block-major/v1"  # kv_cache[num_blocks, num_layers, 2, block_size, Hkv, D]


class KvHandleError(ValueError):
    """A handle dict is malformed; the message names the field."""


def layout_hash(model_id: str, dtype: str, block_size: int, num_layers: int,
                num_kv_heads: int, head_dim: int) -> str:
    """Hash of everything that must match for a block to mean the same bytes on both sides."""
    key = f"{KV_LAYOUT_NAME}|{model_id}|{dtype}|{block_size}|{num_layers}|{num_kv_heads}|{head_dim}"
    return hashlib.blake2b(key.encode(), digest_size=12).hexdigest()


@dataclass(frozen=True)
class KvHandle:
    version: int
    """Protocol version (KV_HANDLE_VERSION)."""
    instance_id: str
    """Prefill engine instance id (uuid4 per process start)."""
    request_id: str
    block_ids: tuple[int, ...]
    """Prefill-side blocks holding the prompt's KV, in token order."""
    num_tokens: int
    """Tokens whose KV the blocks hold."""
    layout_hash: str
    """`layout_hash(...)` of the prefill engine's KV cache."""
    control_address: str
    """ZMQ endpoint of the prefill side's transfer agent, e.g. tcp://127.0.0.1:5555."""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["block_ids"] = list(self.block_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> KvHandle:
        expected = {"version": int, "instance_id": str, "request_id": str, "block_ids": (list, tuple),
                    "num_tokens": int, "layout_hash": str, "control_address": str}
        for name, kind in expected.items():
            if name not in d:
                raise KvHandleError(f"KvHandle dict lacks field {name!r}")
            if not isinstance(d[name], kind):
                raise KvHandleError(f"KvHandle field {name!r} has type {type(d[name]).__name__}")
        if not all(isinstance(b, int) and b >= 0 for b in d["block_ids"]):
            raise KvHandleError("KvHandle field 'block_ids' must hold non-negative ints")
        if d["num_tokens"] < 0:
            raise KvHandleError(f"KvHandle field 'num_tokens' is negative: {d['num_tokens']}")
        return cls(version=d["version"], instance_id=d["instance_id"], request_id=d["request_id"],
                   block_ids=tuple(d["block_ids"]), num_tokens=d["num_tokens"],
                   layout_hash=d["layout_hash"], control_address=d["control_address"])
