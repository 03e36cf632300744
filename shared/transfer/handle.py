"""`KvHandle`: what a prefill engine hands out for a request whose KV it holds.

The handle travels prefill -> gateway (gRPC) -> decode as a plain dict. It names the prefill
process (`instance_id`, a uuid4 drawn at every process start, so a restarted peer on the same
address is a *new* peer), the blocks, and the hash of the wire layout (`KvLayout.wire_hash`) that
both sides must share before any byte moves. The full `KvLayout` of each side (tensor-parallel
size and heads per rank included) travels in the handshake's control messages. Standard library only: the gateway imports this module and no torch.
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


@dataclass(frozen=True)
class KvLayout:
    """What one side's KV pool holds, as exchanged at the transfer handshake.

    The wire format is always whole-head blocks ([L, 2, block_size, num_kv_heads, D] per block):
    a tensor-parallel side gathers or scatters its ranks' head shards (shared/parallel/kv_shards.py),
    so sides at different tensor-parallel sizes interoperate when their wire fields agree."""

    model_id: str
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    """All of the model's kv heads (not one rank's)."""
    head_dim: int
    tensor_parallel_size: int = 1
    kv_heads_per_rank: int = 0
    """Heads in each rank's pool: num_kv_heads / N, or 1 (replicated) when num_kv_heads < N."""

    WIRE_FIELDS = ("model_id", "dtype", "block_size", "num_layers", "num_kv_heads", "head_dim")

    def wire_hash(self) -> str:
        return layout_hash(self.model_id, self.dtype, self.block_size, self.num_layers, self.num_kv_heads,
                           self.head_dim)

    def split_error(self) -> str | None:
        """Why this side's head split is not one a rank layout can hold, or None."""
        n, heads = self.tensor_parallel_size, self.num_kv_heads
        if n < 1 or heads < 1:
            return f"tensor_parallel_size {n} and num_kv_heads {heads} must be positive"
        if heads % n and n % heads:
            return f"num_kv_heads {heads} and tensor_parallel_size {n} do not divide one another"
        if self.kv_heads_per_rank != max(1, heads // n):
            return (f"kv_heads_per_rank {self.kv_heads_per_rank} is not {max(1, heads // n)} "
                    f"({heads} kv heads over {n} ranks)")
        return None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> KvLayout:
        kinds = {"model_id": str, "dtype": str, "block_size": int, "num_layers": int, "num_kv_heads": int,
                 "head_dim": int, "tensor_parallel_size": int, "kv_heads_per_rank": int}
        for name, kind in kinds.items():
            if type(d.get(name)) is not kind:
                raise KvHandleError(f"KV layout field {name!r} is missing or not {kind.__name__}")
        return cls(**{name: d[name] for name in kinds})


def layout_mismatch(prefill: KvLayout, decode: KvLayout) -> str | None:
    """Why KV cannot move from `prefill`'s pool to `decode`'s (every differing wire field with both
    sides' values, or a side whose head split is broken), or None when it can."""
    problems = [f"{side} side: {error}" for side, layout in (("prefill", prefill), ("decode", decode))
                if (error := layout.split_error())]
    problems += [f"{name} prefill {getattr(prefill, name)!r} vs decode {getattr(decode, name)!r}"
                 for name in KvLayout.WIRE_FIELDS if getattr(prefill, name) != getattr(decode, name)]
    if not problems:
        return None
    return (f"KV layout mismatch ({'; '.join(problems)}); prefill holds {_holds(prefill)}, "
            f"decode holds {_holds(decode)}")


def _holds(layout: KvLayout) -> str:
    return (f"{layout.tensor_parallel_size} rank(s) x {layout.kv_heads_per_rank} of {layout.num_kv_heads} kv heads")
