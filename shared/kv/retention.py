"""`SessionRetention`: which block hashes keyed sessions (`prompt_cache_key`) retain, until when.

A session retains its latest turn's blocks (prompt + output): a new turn's hashes replace the
previous turn's, and an expired session retains nothing. The owner of the blocks (the device
pool, the host tier) is told of each change through `on_change(hashes, retained)` and keeps
retained blocks after anonymous ones when it must evict. Hashes, not block ids: a retained block
that was moved to the host tier and back is still retained.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from splitserve.shared.kv.block_hash import BlockHash


class SessionRetention:
    def __init__(self, on_change: Callable[[Sequence[BlockHash], bool], None]) -> None:
        self._on_change = on_change
        self._sessions: dict[str, tuple[list[BlockHash], float]] = {}
        self._next_expiry_s = float("inf")

    def __len__(self) -> int:
        return len(self._sessions)

    def retain(self, key: str, block_hashes: Sequence[BlockHash], until_s: float) -> None:
        """Retain `block_hashes` for `key` until `until_s` (time.monotonic), in place of its previous turn."""
        self._on_change(list(block_hashes), True)  # before the release, so shared hashes never drop out
        self.release(key)
        self._sessions[key] = (list(block_hashes), until_s)
        self._next_expiry_s = min(self._next_expiry_s, until_s)

    def release(self, key: str) -> None:
        hashes, _ = self._sessions.pop(key, ((), 0.0))
        if hashes:
            self._on_change(hashes, False)

    def expire(self, now_s: float) -> None:
        if now_s < self._next_expiry_s:
            return
        for key in [k for k, (_, until) in self._sessions.items() if until <= now_s]:
            self.release(key)
        self._next_expiry_s = min((until for _, until in self._sessions.values()), default=float("inf"))
