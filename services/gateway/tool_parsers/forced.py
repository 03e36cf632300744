"""Parsers of outputs whose shape the grammar forced (`tool_choice` "required" or a named
function), whatever the model family:

    required:  [{"name": "f", "parameters": {...}}, ...]      (forced_call_schema in chat_tools.py)
    named:     {...}                                          (the arguments object only)
"""

from __future__ import annotations

from splitserve.services.gateway.tool_parsers.base import (
    CallSnapshot, Items, ToolParser, checked_arguments, scan_call_object)
from splitserve.services.gateway.tool_parsers.json_scan import Malformed, scan_value, skip_whitespace


class RequiredCallsParser(ToolParser):
    name = "required"

    def scan(self, text: str, final: bool) -> Items:
        items = Items()
        pos = skip_whitespace(text, 0)
        if pos >= len(text):
            return items if not final else Items([text] if text else [])
        if text[pos] != "[":
            items.text(text)
            return items
        try:
            self._calls(text, pos + 1, final, items)
        except Malformed:
            return Items([text])
        return items

    def _calls(self, text: str, pos: int, final: bool, items: Items) -> None:
        while True:
            pos = skip_whitespace(text, pos)
            if pos >= len(text) or text[pos] == "]":
                return
            call, end = scan_call_object(text, pos, final)
            items.call(call)
            if end is None:
                return
            pos = skip_whitespace(text, end)
            if pos < len(text) and text[pos] not in ",]":
                raise Malformed(f"unexpected {text[pos]!r} in the list of tool calls")
            pos += pos < len(text) and text[pos] == ","


class NamedCallParser(ToolParser):
    name = "named"

    def __init__(self, function_name: str) -> None:
        self.function_name = function_name

    def scan(self, text: str, final: bool) -> Items:
        start = skip_whitespace(text, 0)
        try:
            if start < len(text) and text[start] != "{":
                raise Malformed("the arguments must be a JSON object")
            end = scan_value(text, start).end
            if end is None:
                if final:
                    raise Malformed("unfinished arguments")
                return Items([CallSnapshot(self.function_name, text[start:], False)])
            call = CallSnapshot(self.function_name, checked_arguments(text[start:end]), True)
        except Malformed:
            return Items([text])
        return Items([call, text[end:]] if text[end:] else [call])
