"""What the engine hands back: one `EngineOutput` per request per step, and `EngineStats` (its load).
Torch-free, like everything the serving process imports (it relays; the engine process computes).

Both are msgspec structs: they cross from the engine process to the serving process as msgpack
(shared/engine_protocol.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

from splitserve.shared.transfer.handle import KvHandle


class RequestError(ValueError):
    """A request cannot be served as given (too long, bad tokens, duplicate id); the message says why."""


@dataclass(slots=True)
class SampledToken:
    token_id: int
    logprob: float
    rank: int
    top_logprobs: Sequence[tuple[int, float]]
    """The top alternatives asked for; an empty tuple when none were."""


class EngineOutput(msgspec.Struct, array_like=True, gc=False):
    """What one step produced for one request (deltas, not totals). A msgspec struct: a step's
    outputs cross from the engine process to the serving process as one msgpack message, and
    building one is cheaper than a dataclass (this runs for every request every step)."""

    request_id: str
    new_token_ids: list[int] = []
    new_logprobs: list[float] = []
    new_top_logprobs: list[Sequence[tuple[int, float]]] = []
    new_ranks: list[int] = []
    new_prompt_logprobs: list[SampledToken] = []
    """Prompt tokens 1.. (requests that asked for prompt logprobs), with the first output token."""
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_recomputed_tokens: int = 0
    kv_bytes_received: int = 0
    kv_handle: KvHandle | None = None
    kv_load_window_ns: tuple[int, int, bool] | None = None
    """(start, end, ok) wall-clock ns of this request's remote KV load, for the transfer span."""
    error: str | None = None
    """Set when the request failed after it was added: a step failed on it (finish_reason 'error'),
    or its structured-output grammar does not compile or did not in time (finish_reason 'abort')."""


class EngineStats(msgspec.Struct, array_like=True):
    num_running: int
    num_waiting: int
    num_loading_kv: int
    num_held_kv: int
    num_waiting_tokens: int
    num_free_blocks: int
    num_total_blocks: int
    kv_usage: float
    prefix_hit_rate: float
    num_preemptions: int
    kv_group_blocks: dict[str, int] = {}
    """Blocks of each KV layer group's pool ("full", "window_<w>") when the pool is split by group."""
    kv_group_free_blocks: dict[str, int] = {}
    """Free blocks of each of those pools (a sliding pool's null block is never free)."""
