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
        """Retain `block_hashes` for `key` until `until_s` (time.monotonic), in place of its previous turn.

        Only the difference is passed on: a next turn extends the previous one, so the owner
        hears of its new blocks (and of a dropped tail), not of the whole history again."""
        previous, _ = self._sessions.pop(key, ((), 0.0))
        hashes = list(block_hashes)
        num_shared = shared_prefix_len(previous, hashes)
        if hashes[num_shared:]:  # before the release, so hashes the turns share never drop out
            self._on_change(hashes[num_shared:], True)
        if previous[num_shared:]:
            self._on_change(previous[num_shared:], False)
        self._sessions[key] = (hashes, until_s)
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


def shared_prefix_len(a: Sequence[BlockHash], b: Sequence[BlockHash]) -> int:
    """How many leading hashes two chained-hash lists share. A chained hash stands for its whole
    prefix, so equality at i implies equality before i: a binary search finds the end."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        mid = (low + high + 1) // 2
        if a[mid - 1] == b[mid - 1]:
            low = mid
        else:
            high = mid - 1
    return low
