"""Parsers of outputs whose shape the grammar forced (`tool_choice` "required" or a named
function), whatever the model family:

    required:  [{"name": "f", "parameters": {...}}, ...]      (forced_call_schema in chat_tools.py)
    named:     {...}                                          (the arguments object only)

The grammar lets the model write nothing else, so output that ends inside the JSON was cut off
(max_tokens, a stop string), not malformed: it is read as the calls it got to, the last one with
the arguments text written so far (unfinished JSON, as OpenAI returns a call cut by the token
limit), and a call whose name was not finished yet is dropped. The wrapper (`[{"name": ...`) is
never content. Output that is not the forced shape at all (a worker without the grammar) is.
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
            return items
        if text[pos] != "[":
            items.text(text)
            return items
        try:
            self._calls(text, pos + 1, items)
        except Malformed:
            return Items([text])
        if final and items and items[-1].name is None:
            items.pop()  # cut off inside its name: nothing to call
        return items

    def _calls(self, text: str, pos: int, items: Items) -> None:
        while True:
            pos = skip_whitespace(text, pos)
            if pos >= len(text) or text[pos] == "]":
                return
            call, end = scan_call_object(text, pos, final=False)  # unfinished at the end: cut off
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
            if end is None:  # still being written, or cut off
                return Items([CallSnapshot(self.function_name, text[start:], False)])
            call = CallSnapshot(self.function_name, checked_arguments(text[start:end]), True)
        except Malformed:
            return Items([text])
        return Items([call, text[end:]] if text[end:] else [call])
