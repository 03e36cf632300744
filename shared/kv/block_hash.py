"""Chained, process-independent hashes of full KV blocks.

A block's hash covers its own token ids *and* its parent's hash, so equal hashes mean equal whole
prefixes, not just equal blocks. The hash must be the same in every process and on every machine:
the prefill and decode engines and the gateway's prefix-affinity router all compute it
independently. That rules out Python's `hash()` (salted per process); we use blake2b over the
parent digest followed by the token ids packed as little-endian int64.

This module imports nothing but the standard library (the gateway imports no torch).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

BlockHash = bytes

_DIGEST_SIZE = 16  # 128 bits: collisions are out of reach for any realistic cache size
_ROOT_PARENT = b"splitserve/kv-block/v1"  # stands in for the parent of a sequence's first block
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def hash_block_tokens(parent: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """Hash of one block: `parent` is the previous block's hash (None for the first block)."""
    try:
        packed = struct.pack(f"<{len(token_ids)}q", *token_ids)
    except struct.error as exc:
        bad = [t for t in token_ids if not isinstance(t, int) or not _INT64_MIN <= t <= _INT64_MAX]
        raise ValueError(f"token ids must be int64 integers, got {bad[:3]!r}") from exc
    h = hashlib.blake2b(digest_size=_DIGEST_SIZE)
    h.update(_ROOT_PARENT if parent is None else parent)
    h.update(packed)
    return h.digest()


def hash_prompt_blocks(token_ids: Sequence[int], block_size: int) -> list[BlockHash]:
    """Chained hashes of every FULL block of `token_ids` (a trailing partial block is skipped)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    hashes: list[BlockHash] = []
    parent: BlockHash | None = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block_tokens(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes
