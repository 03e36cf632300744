"""Llama 3.x JSON tool calls: the whole output is `{"name": ..., "parameters": {...}}`, optionally
after `<|python_tag|>`, several calls separated by `;`.

An output that does not start with `{` (or the tag) is content. If a later call is malformed,
the calls before it stand and the rest is content.
"""

from __future__ import annotations

from splitserve.services.gateway.tool_parsers.base import Items, ToolParser, scan_call_object
from splitserve.services.gateway.tool_parsers.json_scan import Malformed, skip_whitespace

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    keeps_special_tokens = True  # <|python_tag|>

    def scan(self, text: str, final: bool) -> Items:
        items = Items()
        pos = skip_whitespace(text, 0)
        if text.startswith(PYTHON_TAG, pos):
            pos = skip_whitespace(text, pos + len(PYTHON_TAG))
        elif not final and PYTHON_TAG.startswith(text[pos:]):
            return items  # nothing yet, or part of the tag
        if pos >= len(text) or text[pos] != "{":
            if final or pos < len(text):
                items.text(text)
            return items
        return self._calls(text, pos, final, items)

    def _calls(self, text: str, pos: int, final: bool, items: Items) -> Items:
        while True:
            try:
                call, end = scan_call_object(text, pos, final)
            except Malformed:
                items.text(text if not items else text[pos:])
                return items
            items.call(call)
            if end is None:
                return items
            after = skip_whitespace(text, end)
            if after < len(text) and text[after] == ";":
                pos = skip_whitespace(text, after + 1)
                if pos >= len(text):
                    return items
                continue
            items.text(text[end:])
            return items
