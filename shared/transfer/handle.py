"""`KvHandle`: what a prefill engine hands out for a request whose KV it holds.

The handle travels prefill -> gateway (gRPC) -> decode as a plain dict. It names the prefill
process (`instance_id`, a uuid4 drawn at every process start, so a restarted peer on the same
address is a *new* peer), the blocks, and the hash of the wire layout (`KvLayout.wire_hash`) that
both sides must share before any byte moves. The full `KvLayout` of each side (tensor-parallel
size and heads per rank included) travels in the handshake's control messages. Standard library only: the gateway imports this module and no torch.

A pool split by KV layer group (interleaved sliding-window models, shared/kv/layer_groups.py) has
one block list per group (`KvHandle.groups`, `block_ids` then empty): the full-attention group's
covers the whole prompt, a sliding group's only the blocks its window can still see at the
prompt's end (the rest slid out), so each list ends at the prompt's last block. The group layout
(each group's window and layers) is part of the wire hash, so a split side and a one-pool side,
or sides split differently, refuse each other's handles by name.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

KV_HANDLE_VERSION = 1
KV_LAYOUT_NAME = "block-major/v1"  # kv_cache[num_blocks, num_layers, 2, block_size, Hkv, D]


class KvHandleError(ValueError):
    """A handle dict is malformed; the message names the field."""


KvGroup = tuple[int | None, tuple[int, ...]]
"""One KV layer group of a split pool: (window, or None for full attention; its layer indices)."""


def layout_hash(model_id: str, dtype: str, block_size: int, num_layers: int,
                num_kv_heads: int, head_dim: int, kv_groups: tuple[KvGroup, ...] = ()) -> str:
    """Hash of everything that must match for a block to mean the same bytes on both sides (a
    one-pool layout hashes as it did before groups existed)."""
    key = f"{KV_LAYOUT_NAME}|{model_id}|{dtype}|{block_size}|{num_layers}|{num_kv_heads}|{head_dim}"
    if kv_groups:
        key += "|groups:" + ";".join(f"{window}:{','.join(map(str, layers))}" for window, layers in kv_groups)
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
    groups: tuple[tuple[int, ...], ...] = ()
    """A pool split by KV layer group: each group's blocks, in group order, each list ending at the
    prompt's last block (a sliding group's starts where its window begins); `block_ids` is empty."""
    block_hashes: tuple[bytes, ...] = ()
    """Chained hashes of the prompt's full blocks (shared/kv/block_hash.py), so the decode side
    registers the loaded blocks without hashing the prompt; () when the prefill had none."""

    def block_lists(self) -> list[tuple[int, ...]]:
        """One block list per pool: the split pool's groups, or the one pool's `block_ids`."""
        return list(self.groups) if self.groups else [self.block_ids]

    @property
    def num_blocks(self) -> int:
        return sum(map(len, self.block_lists()))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["block_ids"] = list(self.block_ids)
        d["groups"] = [list(ids) for ids in self.groups]
        d["block_hashes"] = list(self.block_hashes)
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
        _check_ids(d["block_ids"], "block_ids")
        groups = d.get("groups", ())
        if not isinstance(groups, (list, tuple)):
            raise KvHandleError(f"KvHandle field 'groups' has type {type(groups).__name__}")
        for i, ids in enumerate(groups):
            _check_ids(ids, f"groups[{i}]")
        if groups and d["block_ids"]:
            raise KvHandleError("KvHandle sets both 'block_ids' (one pool) and 'groups' (a split pool)")
        if d["num_tokens"] < 0:
            raise KvHandleError(f"KvHandle field 'num_tokens' is negative: {d['num_tokens']}")
        hashes = d.get("block_hashes", ())
        if not isinstance(hashes, (list, tuple)) or not all(isinstance(h, bytes) and h for h in hashes):
            raise KvHandleError("KvHandle field 'block_hashes' must hold non-empty bytes")
        return cls(version=d["version"], instance_id=d["instance_id"], request_id=d["request_id"],
                   block_ids=tuple(d["block_ids"]), num_tokens=d["num_tokens"],
                   layout_hash=d["layout_hash"], control_address=d["control_address"],
                   groups=tuple(tuple(ids) for ids in groups), block_hashes=tuple(hashes))


def _check_ids(ids, name: str) -> None:
    if not isinstance(ids, (list, tuple)) or not all(type(b) is int and b >= 0 for b in ids):
        raise KvHandleError(f"KvHandle field {name!r} must hold non-negative ints")


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
    kv_groups: tuple[KvGroup, ...] = ()
    """A pool split by KV layer group: each group's (window, layers), in pool order; () one pool."""
    group_num_blocks: tuple[int, ...] = ()
    """Blocks of each group's pool (this side's own sizing: not a wire field)."""

    WIRE_FIELDS = ("model_id", "dtype", "block_size", "num_layers", "num_kv_heads", "head_dim", "kv_groups")

    def wire_hash(self) -> str:
        return layout_hash(self.model_id, self.dtype, self.block_size, self.num_layers, self.num_kv_heads,
                           self.head_dim, self.kv_groups)

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
        d = asdict(self)
        d["kv_groups"] = [[window, list(layers)] for window, layers in self.kv_groups]
        d["group_num_blocks"] = list(self.group_num_blocks)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> KvLayout:
        kinds = {"model_id": str, "dtype": str, "block_size": int, "num_layers": int, "num_kv_heads": int,
                 "head_dim": int, "tensor_parallel_size": int, "kv_heads_per_rank": int}
        for name, kind in kinds.items():
            if type(d.get(name)) is not kind:
                raise KvHandleError(f"KV layout field {name!r} is missing or not {kind.__name__}")
        return cls(**{name: d[name] for name in kinds}, kv_groups=_groups_from(d.get("kv_groups", [])),
                   group_num_blocks=tuple(_ints_from(d.get("group_num_blocks", []), "group_num_blocks")))


def _groups_from(value) -> tuple[KvGroup, ...]:
    """`kv_groups` as JSON gives it back: [[window or null, [layer, ...]], ...]."""
    if not isinstance(value, (list, tuple)):
        raise KvHandleError("KV layout field 'kv_groups' is not a list")
    groups = []
    for entry in value:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and (entry[0] is None or type(entry[0]) is int)):
            raise KvHandleError(f"KV layout field 'kv_groups' holds {entry!r}, not [window or null, [layers]]")
        groups.append((entry[0], tuple(_ints_from(entry[1], "kv_groups"))))
    return tuple(groups)


def _ints_from(value, name: str) -> list[int]:
    if not isinstance(value, (list, tuple)) or not all(type(v) is int and v >= 0 for v in value):
        raise KvHandleError(f"KV layout field {name!r} must be a list of non-negative ints")
    return list(value)


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
    heads = f"{layout.tensor_parallel_size} rank(s) x {layout.kv_heads_per_rank} of {layout.num_kv_heads} kv heads"
    if not layout.kv_groups:
        return f"{heads} in one pool"
    groups = ", ".join(f"{'full' if window is None else f'window {window}'} ({len(layers)} layers, {n} blocks)"
                       for (window, layers), n in zip(layout.kv_groups, layout.group_num_blocks))
    return f"{heads} in a pool split by layer group: {groups}"
