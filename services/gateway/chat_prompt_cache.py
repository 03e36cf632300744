"""`ChatPromptCache`: a keyed chat session's next prompt tokenized from its last split token on.

An agent sends the whole conversation every turn. The chat template's render is cheap (about a
tenth of the time); tokenizing the rendered text is the cost (docs/benchmarks.md, section 12,
"the chat prompt's render and tokenization"). Per session key the cache keeps the last prompt's
text, its token ids and its *split tokens*: added tokens the tokenizer matches before normalizing
and pre-tokenizing (a template's role and turn markers), where tokenization starts afresh. A next
prompt whose text shares a prefix with the cached one through split token k is tokenized as

    cached ids before k  +  encode(text from k's first character on)

The tail starts with token k itself, so the segment after it is "not the text's first" in both
tokenizations (Metaspace `prepend_scheme: first`), and any whitespace k strips (lstrip/rstrip) is
stripped alike. The ids are then those of the full tokenization, because:

- every text segment between split tokens is normalized, pre-tokenized and tokenized on its own;
- the texts agree through k's end, so every split token that ends there is matched in both, unless
  one added token contains another (a longer match could begin before k and run past the shared
  prefix): such a tokenizer keeps the cache off;
- the wrapper's `encode` is the Rust tokenizer's (a subclass that overrides it keeps the cache off).

`for_tokenizer` also tries the rule on sample texts at start-up and turns the cache off for good
when any result differs from the full path's. The entries are self-checking (the shared prefix is
found by comparing texts), so a stale or reused key costs a full tokenization, never wrong ids.
Only keyed requests are cached: the key names the conversation (the engine keeps its KV anyway);
without one there is no cheap way to find a previous turn. Bounded LRU by sessions and bytes;
safe under the gateway's tokenizer threads (one lock around the table, encoding outside it).
"""

from __future__ import annotations

import logging
import sys
import threading
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from splitserve.services.gateway.chat_split_rule import split_rule_failure, split_token_ids

logger = logging.getLogger(__name__)

_ANCHOR_BYTES = 100  # a (token index, start, end) tuple of ints, roughly


@dataclass(frozen=True)
class _Entry:
    text: str
    token_ids: array
    anchors: list[tuple[int, int, int]]
    """(token index, first char, char past the end) of each split token, in order."""

    @property
    def num_bytes(self) -> int:
        ids_bytes = self.token_ids.itemsize * len(self.token_ids)
        return sys.getsizeof(self.text) + ids_bytes + _ANCHOR_BYTES * len(self.anchors)


class ChatPromptCache:
    def __init__(self, tokenizer: Any, split_ids: frozenset[int], max_bytes: int = 256 << 20,
                 max_sessions: int = 10_000) -> None:
        self.tokenizer = tokenizer
        self.enabled = bool(split_ids) and max_bytes > 0
        self.max_bytes, self.max_sessions = max_bytes, max_sessions
        self._split_ids = split_ids
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._num_bytes = 0
        self._lock = threading.Lock()

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, max_bytes: int = 256 << 20, max_sessions: int = 10_000) -> ChatPromptCache:
        """The cache for `tokenizer`, off (every prompt tokenized whole) unless the split rule holds."""
        try:
            failure = split_rule_failure(tokenizer)
        except Exception as exc:  # a tokenizer the check cannot even drive: tokenize every prompt whole
            failure = f"the check failed: {exc!r}"
        if failure is not None:
            logger.info("chat prompt cache off for this tokenizer: %s", failure)
            return cls(tokenizer, frozenset(), 0, 0)
        return cls(tokenizer, split_token_ids(tokenizer), max_bytes, max_sessions)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def num_bytes(self) -> int:
        return self._num_bytes

    def encode(self, key: str | None, text: str) -> list[int]:
        """The token ids of `text` (a rendered chat prompt), as `tokenizer.encode(text,
        add_special_tokens=False)` gives them."""
        return self.encode_reusing(key, text)[0]

    def encode_reusing(self, key: str | None, text: str) -> tuple[list[int], int]:
        """(token ids, how many of them came from the session's cached prompt)."""
        if not self.enabled or key is None:
            return list(self.tokenizer.encode(text, add_special_tokens=False)), 0
        with self._lock:
            entry = self._entries.get(key)
        ids, anchors, num_reused = self._extend(entry, text) if entry is not None else (*self._encode_all(text), 0)
        self._store(key, _Entry(text, array("i", ids), anchors))
        return ids, num_reused

    def _encode_all(self, text: str, start: int = 0) -> tuple[list[int], list[tuple[int, int, int]]]:
        encoding = self.tokenizer.backend_tokenizer.encode(text[start:], add_special_tokens=False)
        ids, chars = encoding.ids, encoding.token_to_chars  # chars of the split tokens only, not all offsets
        return ids, [(i, start + chars(i)[0], start + chars(i)[1]) for i, t in enumerate(ids) if t in self._split_ids]

    def _extend(self, entry: _Entry, text: str) -> tuple[list[int], list[tuple[int, int, int]], int]:
        k = _last_shared_anchor(entry, text)
        if k < 0:
            return *self._encode_all(text), 0
        index, start, _ = entry.anchors[k]
        tail_ids, tail_anchors = self._encode_all(text, start)
        if not tail_ids or tail_ids[0] != entry.token_ids[index]:  # cannot happen while the rule holds
            return *self._encode_all(text), 0
        ids = entry.token_ids[:index].tolist() + tail_ids
        return ids, entry.anchors[:k] + [(index + i, s, e) for i, s, e in tail_anchors], index

    def _store(self, key: str, entry: _Entry) -> None:
        with self._lock:
            old = self._entries.pop(key, None)
            self._num_bytes -= old.num_bytes if old is not None else 0
            if entry.num_bytes > self.max_bytes:
                return
            self._num_bytes += entry.num_bytes
            self._entries[key] = entry
            while len(self._entries) > self.max_sessions or self._num_bytes > self.max_bytes:
                self._num_bytes -= self._entries.popitem(last=False)[1].num_bytes


def _last_shared_anchor(entry: _Entry, text: str) -> int:
    """The last split token of `entry` whose span lies in the prefix `text` shares with its text, or -1."""
    anchors = entry.anchors
    if text.startswith(entry.text):  # the usual next turn: the old prompt extended
        return len(anchors) - 1
    low, high = 0, len(anchors)  # anchors[:low] are shared, anchors[high:] are not
    while low < high:
        mid = (low + high) // 2
        end = anchors[mid][2]
        if text[:end] == entry.text[:end]:
            low = mid + 1
        else:
            high = mid
    return low - 1
