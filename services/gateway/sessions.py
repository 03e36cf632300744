"""`SessionDirectory`: which worker instance holds each keyed session's latest turn.

A request with `prompt_cache_key` leaves its blocks (prompt + output) retained on the instance
that ran it last: the colocated worker, or in a disaggregated pair the decode instance (which
computed the output's KV). The router sends the session's next turn back there. An entry records
the instance and the hash of the turn's last full block, so a next prompt that really extends the
turn is told apart from one that merely reuses the key, and how many of its tokens the instance
holds. Bounded LRU: the oldest sessions are forgotten first (their next turn routes by load).

The check digests the held tokens in one pass (`prefix_digest`) rather than chaining a hash per
block as the engines do: the directory never compares per-block hashes, and a turn's history is
thousands of tokens on every request's path (docs/benchmarks.md, section 12, session 8).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SessionPlace:
    url: str
    num_held_tokens: int
    """Tokens of the latest turn in full blocks (the last token sampled has no KV yet)."""
    digest: bytes
    """`prefix_digest` of those tokens."""


def prefix_digest(token_ids: Sequence[int]) -> bytes:
    """128 bits over the token ids packed as int64 (ids are validated or sampled: in range)."""
    return hashlib.blake2b(array("q", token_ids).tobytes(), digest_size=16).digest()


class SessionDirectory:
    def __init__(self, max_sessions: int = 100_000) -> None:
        self.max_sessions = max_sessions
        self._places: OrderedDict[str, SessionPlace] = OrderedDict()

    def __len__(self) -> int:
        return len(self._places)

    def remember(self, key: str, url: str, turn_token_ids: Sequence[int], block_size: int) -> None:
        """The turn (prompt + output token ids) ran on `url`; its blocks are retained there."""
        num_held = (len(turn_token_ids) - 1) // block_size * block_size
        if num_held <= 0:
            self._places.pop(key, None)
            return
        self._places[key] = SessionPlace(url, num_held, prefix_digest(turn_token_ids[:num_held]))
        self._places.move_to_end(key)
        while len(self._places) > self.max_sessions:
            self._places.popitem(last=False)

    def held_tokens(self, key: str, prompt_token_ids: Sequence[int], block_size: int) -> tuple[str | None, int]:
        """(url, leading prompt tokens that instance holds) for the session's next prompt; (None, 0)
        when the key is unknown or the prompt does not extend its latest turn."""
        place = self._places.get(key)
        if place is None or place.num_held_tokens > len(prompt_token_ids):
            return None, 0
        if prefix_digest(prompt_token_ids[: place.num_held_tokens]) != place.digest:
            return place.url, 0
        self._places.move_to_end(key)
        return place.url, place.num_held_tokens
