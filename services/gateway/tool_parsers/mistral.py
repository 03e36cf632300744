"""Mistral tool calls, both formats after the `[TOOL_CALLS]` special token:

    [TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]          (tokenizers before v11)
    [TOOL_CALLS]f[ARGS]{...}[TOOL_CALLS]g[ARGS]{...}               (v11 and later)

Text before the first marker is content; from a malformed call on, the text is content.
Call ids are 9 letters and digits, which Mistral's chat templates require.
"""

from __future__ import annotations

import re

from splitserve.services.gateway.tool_parsers.base import (
    CallSnapshot, Items, ToolParser, checked_arguments, hold_marker_prefix, mistral_call_id, scan_call_object)
from splitserve.services.gateway.tool_parsers.json_scan import Malformed, scan_value, skip_whitespace

MARKER, ARGS = "[TOOL_CALLS]", "[ARGS]"
_NAME = re.compile(r"[A-Za-z0-9_.\-]*")


class MistralToolParser(ToolParser):
    name = "mistral"
    keeps_special_tokens = True

    def new_call_id(self) -> str:
        return mistral_call_id()

    def scan(self, text: str, final: bool) -> Items:
        items = Items()
        start = text.find(MARKER)
        if start < 0:
            items.text(text if final else hold_marker_prefix(text, MARKER))
            return items
        items.text(text[:start])
        pos: int | None = start
        while pos is not None and text.startswith(MARKER, pos):
            marker, num_items = pos, len(items)
            body = skip_whitespace(text, pos + len(MARKER))
            try:
                pos = (self._array(text, body, final, items) if text.startswith("[", body)
                       else self._named(text, body, final, items))
            except Malformed:
                del items[num_items:]  # this marker's calls so far: the whole block is text
                items.text(text[marker:])
                return items
            if pos is not None:
                pos = _next_marker(text, pos, final, items)
        return items

    def _named(self, text: str, pos: int, final: bool, items: Items) -> int | None:
        args = text.find(ARGS, pos)
        if args < 0:
            if final or _NAME.fullmatch(hold_marker_prefix(text[pos:], ARGS)) is None:
                raise Malformed("a tool call name must be followed by [ARGS]")
            items.call(CallSnapshot(None, "", False))
            return None
        name = text[pos:args].strip()
        if not name or _NAME.fullmatch(name) is None:
            raise Malformed(f"bad tool name {name!r}")
        body = skip_whitespace(text, args + len(ARGS))
        if body < len(text) and text[body] != "{":
            raise Malformed("tool arguments must be a JSON object")
        end = scan_value(text, body).end
        if end is None:
            if final:
                raise Malformed("unfinished tool arguments")
            items.call(CallSnapshot(name, text[body:], False))
            return None
        items.call(CallSnapshot(name, checked_arguments(text[body:end]), True))
        return end

    def _array(self, text: str, pos: int, final: bool, items: Items) -> int | None:
        pos += 1
        while True:
            pos = skip_whitespace(text, pos)
            if pos >= len(text):
                return len(text) if final else None
            if text[pos] == "]":
                return pos + 1
            call, end = scan_call_object(text, pos, final)
            items.call(call)
            if end is None:
                return None
            pos = skip_whitespace(text, end)
            if pos < len(text) and text[pos] not in ",]":
                raise Malformed(f"unexpected {text[pos]!r} in the list of tool calls")
            pos += pos < len(text) and text[pos] == ","


def _next_marker(text: str, pos: int, final: bool, items: Items) -> int | None:
    """Position of the next `[TOOL_CALLS]` after `pos` (the text before it is content), else None."""
    found = text.find(MARKER, pos)
    if found >= 0:
        items.text(text[pos:found])
        return found
    items.text(text[pos:] if final else hold_marker_prefix(text[pos:], MARKER))
    return None
