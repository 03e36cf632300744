"""What rank 0 sends its followers, one plain object per model call, and how it travels.

Rank 0 owns the scheduler and the requests; a follower owns only its shard of the model and of
the KV pool. So rank 0 sends the host arrays of each forward (the same ones its own runner uploads),
which rows go through the LM head, the few start-up calls (bind the KV pool, the profiling and
warm-up steps, CUDA-graph capture), and the KV hand-overs of P/D (gather a held prompt's head
shards to rank 0, scatter loaded whole-head blocks from it). A follower runs each call in order; every call that contains a
collective is made by all ranks in the same order, so their all-reduces and all-gathers pair up.

Transport: ZeroMQ PUSH (rank 0) -> PULL (follower) over tcp://127.0.0.1, each frame
HMAC-SHA256(key, body) || body with body a pickle, the key fresh per worker and handed to the
follower through its spawn arguments, so nothing else on the host can inject a call. ZeroMQ rather
than a torch.distributed broadcast because an idle follower must wait for the next step without a
collective timeout firing, and must notice on its own (parent pid) that rank 0 is gone.
"""

from __future__ import annotations

import hashlib
import hmac
import pickle
from dataclasses import dataclass

import numpy as np

_DIGEST = hashlib.sha256().digest_size


@dataclass
class StepArrays:
    """The host side of one forward's inputs (see runner.py for their meaning)."""

    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    query_start_loc: np.ndarray  # [B+1] int32
    seq_lens: np.ndarray  # [B] int32
    block_tables: np.ndarray  # [B, W] int32
    slot_mapping: np.ndarray  # [T] int64
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]


@dataclass
class Forward:
    arrays: StepArrays
    graph: bool
    """Replay the captured decode CUDA graph instead of running the model eagerly."""


@dataclass
class Logits:
    rows: list[int]
    """Rows of the last forward's hidden states that go through the LM head."""


@dataclass
class BindKV:
    num_blocks: int
    block_size: int


@dataclass
class FakeStep:
    """`run_fake_mixed_step` (start-up profiling and warm-up)."""

    num_tokens: int
    block_size: int


@dataclass
class CaptureGraphs:
    max_batch: int
    max_model_len: int
    block_size: int


@dataclass
class GatherKV:
    """Send this rank's head shard of `block_ids` to rank 0 (a prefill hands the blocks over)."""

    block_ids: list[int]


@dataclass
class ScatterKV:
    """Receive this rank's head shard of `block_ids` from rank 0 (a decode loaded the blocks)."""

    block_ids: list[int]


@dataclass
class Stop:
    pass


def seal(key: bytes, message: object) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return hmac.new(key, body, hashlib.sha256).digest() + body


def unseal(key: bytes, frame: bytes) -> object:
    """The message, or ValueError for a frame not signed with `key` (never unpickled)."""
    tag, body = frame[:_DIGEST], frame[_DIGEST:]
    if not hmac.compare_digest(tag, hmac.new(key, body, hashlib.sha256).digest()):
        raise ValueError("tensor-parallel control frame with a bad signature")
    return pickle.loads(body)
