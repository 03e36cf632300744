"""Hermes / Qwen2.5 / Qwen3 tool calls: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`.

Text before, between and after the calls is content. A call whose JSON is finished counts even
without its closing tag (the model may stop right after the JSON). A call whose body is not a
call object is content, up to and including its closing tag.
"""

from __future__ import annotations

import json

from splitserve.services.gateway.tool_parsers.base import (
    Items, ToolParser, hold_marker_prefix, scan_call_object)
from splitserve.services.gateway.tool_parsers.json_scan import Malformed, skip_whitespace

START, END = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):
    name = "hermes"
    call_trigger = START

    @classmethod
    def call_tag(cls, name: str) -> tuple[str, str]:
        # The layout of the Qwen/Hermes templates' own example call.
        return f'{START}\n{{"name": {json.dumps(name)}, "arguments": ', f"}}\n{END}"

    def scan(self, text: str, final: bool) -> Items:
        items, pos = Items(), 0
        while pos is not None:
            start = text.find(START, pos)
            if start < 0:
                items.text(text[pos:] if final else hold_marker_prefix(text[pos:], START))
                return items
            items.text(text[pos:start])
            pos = self._call(text, start, final, items)
        return items

    def _call(self, text: str, start: int, final: bool, items: Items) -> int | None:
        """Scan the call at `start`; the position after it, or None if the text ends inside it."""
        body = skip_whitespace(text, start + len(START))
        try:
            call, end = scan_call_object(text, body, final)
        except Malformed:
            return _as_text(text, start, final, items)
        items.call(call)
        if end is None:
            return None
        after = skip_whitespace(text, end)
        if text.startswith(END, after):
            return after + len(END)
        if END.startswith(text[after:]):  # nothing yet, or part of the closing tag
            return len(text) if final else None
        return end


def _as_text(text: str, start: int, final: bool, items: Items) -> int | None:
    close = text.find(END, start)
    if close < 0:
        items.text(text[start:] if final else hold_marker_prefix(text[start:], END))
        return None
    items.text(text[start:close + len(END)])
    return close + len(END)
