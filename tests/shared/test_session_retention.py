"""SessionRetention passes on only what a new turn changes, and ends with the same retained set
as retaining every turn's hashes whole would."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from splitserve.shared.kv import hash_prompt_blocks
from splitserve.shared.kv.retention import SessionRetention, shared_prefix_len


class Recorder:
    def __init__(self) -> None:
        self.counts: Counter[bytes] = Counter()
        self.calls: list[tuple[int, bool]] = []

    def __call__(self, hashes, retained: bool) -> None:
        self.calls.append((len(hashes), retained))
        self.counts.update({h: 1 if retained else -1 for h in hashes})
        self.counts += Counter()  # drop zeros


def test_a_next_turn_passes_on_only_its_new_blocks():
    owner = Recorder()
    sessions = SessionRetention(owner)
    history = list(range(1000, 1000 + 64 * 4))
    sessions.retain("agent", hash_prompt_blocks(history, 4), 10.0)
    sessions.retain("agent", hash_prompt_blocks(history + [1] * 8, 4), 20.0)
    assert owner.calls == [(64, True), (2, True)]
    sessions.retain("agent", hash_prompt_blocks(history[:8] + [5] * 8, 4), 30.0)  # the history was edited
    assert owner.calls[-2:] == [(2, True), (64, False)]
    assert set(owner.counts) == set(hash_prompt_blocks(history[:8] + [5] * 8, 4))
    sessions.expire(31.0)
    assert not owner.counts and len(sessions) == 0


@given(st.lists(st.tuples(st.sampled_from("ab"), st.lists(st.integers(0, 3), max_size=12)), max_size=8))
def test_the_retained_counts_match_retaining_every_turn_whole(turns):
    owner = Recorder()
    sessions = SessionRetention(owner)
    latest: dict[str, list[bytes]] = {}
    for key, tokens in turns:
        hashes = hash_prompt_blocks(tokens, 2)
        sessions.retain(key, hashes, 1.0)
        latest[key] = hashes
    expected = Counter(h for hashes in latest.values() for h in hashes)
    assert owner.counts == expected


@given(st.lists(st.integers(0, 2), max_size=10), st.lists(st.integers(0, 2), max_size=10))
def test_shared_prefix_len_of_chained_hashes(a, b):
    ha, hb = hash_prompt_blocks(a, 1), hash_prompt_blocks(b, 1)
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    assert shared_prefix_len(ha, hb) == n
