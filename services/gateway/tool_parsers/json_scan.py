"""An incremental scanner for the JSON a model writes into a tool call.

`scan_value(text, pos)` walks one JSON value that starts at `pos` and says where it ends, or that
`text` ends inside it (a stream that has not finished the value yet), or raises `Malformed` as soon
as the text cannot become JSON. For an object it also records where each top-level member's value
starts and ends, so a parser can read `"name"` as soon as its string closes and stream the raw text
of `"arguments"` while it is still being written.

The scanner checks structure (brackets, strings, member syntax), not every detail of numbers and
literals; a finished value is always confirmed with `json.loads` by the caller.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

_STRING = re.compile(r'"(?:[^"\\\n]|\\.)*"', re.S)
_STRING_PREFIX = re.compile(r'"(?:[^"\\\n]|\\.)*\\?$', re.S)
_WHITESPACE = " \t\r\n"
_VALUE_START = set('{["-0123456789tfn')
_CLOSERS = {"{": "}", "[": "]"}


class Malformed(ValueError):
    """The text cannot be (the start of) the JSON value expected here."""


@dataclass
class Member:
    value_start: int
    value_end: int | None = None  # exclusive; None while the value is unfinished


@dataclass
class ValueScan:
    start: int
    end: int | None  # exclusive; None: the text ends inside the value
    members: dict[str, Member] = field(default_factory=dict)  # top-level members, for an object


def skip_whitespace(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WHITESPACE:
        pos += 1
    return pos


def scan_value(text: str, pos: int) -> ValueScan:
    """Scan the JSON value at `pos` (no leading whitespace)."""
    if pos >= len(text):
        return ValueScan(pos, None)
    if text[pos] not in _VALUE_START:
        raise Malformed(f"unexpected {text[pos]!r} where a JSON value should start")
    if text[pos] == '"':
        match = _STRING.match(text, pos)
        if match is None:
            _check_string_prefix(text, pos)
            return ValueScan(pos, None)
        return ValueScan(pos, match.end())
    if text[pos] in _CLOSERS:
        return _scan_container(text, pos)
    return _scan_atom(text, pos)


def _check_string_prefix(text: str, pos: int) -> None:
    if _STRING_PREFIX.match(text, pos) is None:
        raise Malformed("a line break inside a JSON string")


def _scan_atom(text: str, pos: int) -> ValueScan:
    end = pos
    while end < len(text) and text[end] not in _WHITESPACE + ",]}":
        end += 1
    return ValueScan(pos, end if end < len(text) else None)


def _scan_container(text: str, pos: int) -> ValueScan:
    scan = ValueScan(pos, None)
    stack = [text[pos]]
    expect_key = text[pos] == "{"
    key: str | None = None
    i = pos + 1
    while i < len(text):
        ch = text[i]
        top_level = len(stack) == 1 and stack[0] == "{"
        if ch in _WHITESPACE:
            i += 1
            continue
        if ch == '"':
            match = _STRING.match(text, i)
            if match is None:
                _check_string_prefix(text, i)
                return scan
            if top_level and expect_key:
                key, expect_key = json.loads(match.group()), False
            elif top_level:
                _close_member(scan, key, match.end())
            i = match.end()
            continue
        if top_level and ch == ":":
            if key is None:
                raise Malformed("':' without a key")
            start = skip_whitespace(text, i + 1)
            if start < len(text) and text[start] not in _VALUE_START:
                raise Malformed(f"unexpected {text[start]!r} after a member name")
            scan.members.setdefault(key, Member(start))
            i += 1
            continue
        if ch in _CLOSERS:
            stack.append(ch)
        elif ch in "]}":
            if _CLOSERS[stack.pop()] != ch:
                raise Malformed(f"mismatched {ch!r}")
            if len(stack) == 1 and stack[0] == "{":
                _close_member(scan, key, i + 1)
        elif ch == "," and top_level:
            key, expect_key = None, True
        elif top_level and expect_key:
            raise Malformed(f"unexpected {ch!r} where a member name should start")
        if not stack:
            scan.end = i + 1
            return scan
        i = _after_atom(text, i, top_level, scan, key)
    return scan


def _close_member(scan: ValueScan, key: str | None, end: int) -> None:
    member = scan.members.get(key) if key is not None else None
    if member is not None and member.value_end is None:
        member.value_end = end


def _after_atom(text: str, i: int, top_level: bool, scan: ValueScan, key: str | None) -> int:
    """Skip a number or literal (true, false, null); record it if it is a top-level member value."""
    if text[i] not in "-0123456789tfn":
        return i + 1
    end = i
    while end < len(text) and text[end] not in _WHITESPACE + ",]}":
        end += 1
    if top_level and end < len(text):
        _close_member(scan, key, end)
    return end
