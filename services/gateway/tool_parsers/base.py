"""The one interface every tool-call parser implements, and the streaming built on it.

A parser turns the text a model wrote into `Item`s: plain text (`str`) and calls (`CallSnapshot`).
It scans the whole text so far each time (`scan(text, final)`), and a scan of a prefix of the text
must be a prefix of the scan of the whole text: text that might still turn into a call marker is
held back, a call's name appears once its JSON string is closed, and its `arguments` are the raw
JSON text the model wrote, growing as the model writes it. `ToolCallStream` diffs successive scans
into OpenAI's deltas (content, then per call: index, id and name first, then argument fragments),
so streamed and whole responses carry the same calls by construction. A call that turns out
malformed (bad JSON, unfinished at the end) is given back as plain text; if that is only found
after its name was streamed, the stream has already sent a call (no model can be un-sent). A
parser may instead end (`final`) with an unfinished call it means: the forced parsers' call cut
off by the token limit (forced.py), whose arguments are the text written so far.

Whitespace-only text between or around calls is dropped when the output has calls.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass, field
from typing import ClassVar, Union

from splitserve.services.gateway.tool_parsers.json_scan import Malformed, scan_value


@dataclass
class CallSnapshot:
    """One call as far as the text goes."""

    name: str | None  # None until the name is complete
    arguments: str  # raw JSON text of the arguments so far; the whole object once `complete`
    complete: bool


Item = Union[str, CallSnapshot]


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text


@dataclass
class ToolCallDelta:
    index: int
    id: str | None = None  # with `name`, in the first delta of a call only
    name: str | None = None
    arguments: str = ""


@dataclass
class ParsedDelta:
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


class ToolParser:
    """Subclasses set `name` and implement `scan`."""

    name: ClassVar[str]
    keeps_special_tokens: ClassVar[bool] = False
    """The call markers are special tokens, so the text must be detokenized with them."""
    call_trigger: ClassVar[str | None] = None
    """The text that opens a call, if calls can be held to their schema from there on (strict
    tools under tool_choice auto: chat_tools.strict_calls_spec); None: they cannot."""

    @classmethod
    def call_tag(cls, name: str) -> tuple[str, str]:
        """(begin, end): the text around the arguments object of a call to `name`, `begin`
        starting with `call_trigger`."""
        raise NotImplementedError

    def scan(self, text: str, final: bool) -> list[Item]:
        raise NotImplementedError

    def new_call_id(self) -> str:
        return "call_" + secrets.token_hex(12)


@dataclass
class ParsedOutput:
    content: str | None
    tool_calls: list[ToolCall]


def parse_output(parser: ToolParser, text: str, max_calls: int | None = None) -> ParsedOutput:
    """The calls and the content of a whole output (non-streaming)."""
    items = parser.scan(text, final=True)
    calls = [c for c in items if isinstance(c, CallSnapshot)][:max_calls]
    content = visible_content(items, final=True)
    tool_calls = [ToolCall(parser.new_call_id(), c.name, c.arguments) for c in calls]
    return ParsedOutput(content if content or not tool_calls else None, tool_calls)


def visible_content(items: list[Item], final: bool) -> str:
    has_calls = any(isinstance(i, CallSnapshot) for i in items)
    texts = [i for i in items if isinstance(i, str)]
    if not final and items and isinstance(items[-1], str) and not items[-1].strip():
        texts.pop()  # whitespace that may yet sit next to a call: held until we know
    return "".join(t for t in texts if t.strip() or not has_calls)


class ToolCallStream:
    """Feed text deltas, get content and tool-call deltas; `finish()` at the end of the output."""

    def __init__(self, parser: ToolParser, max_calls: int | None = None) -> None:
        self.parser, self.max_calls = parser, max_calls
        self.text = ""
        self._content_sent = 0
        self._arguments_sent: list[int] = []
        self.call_ids: list[str] = []

    def feed(self, delta: str) -> ParsedDelta:
        self.text += delta
        return self._diff(self.parser.scan(self.text, final=False), final=False)

    def finish(self) -> ParsedDelta:
        return self._diff(self.parser.scan(self.text, final=True), final=True)

    def _diff(self, items: list[Item], final: bool) -> ParsedDelta:
        content = visible_content(items, final)
        out = ParsedDelta(content[self._content_sent:])
        self._content_sent = max(self._content_sent, len(content))
        calls = [c for c in items if isinstance(c, CallSnapshot)][:self.max_calls]
        for index, call in enumerate(calls):
            if call.name is None:
                break
            if index == len(self._arguments_sent):
                self.call_ids.append(self.parser.new_call_id())
                out.tool_calls.append(ToolCallDelta(index, self.call_ids[index], call.name))
                self._arguments_sent.append(0)
            fragment = call.arguments[self._arguments_sent[index]:]
            if fragment:
                out.tool_calls.append(ToolCallDelta(index, arguments=fragment))
                self._arguments_sent[index] = len(call.arguments)
        return out


# ---- helpers shared by the parsers --------------------------------------------------------------

class Items(list):
    """A scan's result: adjacent text merged into one item."""

    def text(self, text: str) -> None:
        if not text:
            return
        if self and isinstance(self[-1], str):
            self[-1] += text
        else:
            self.append(text)

    def call(self, call: CallSnapshot) -> None:
        self.append(call)


def hold_marker_prefix(text: str, marker: str) -> str:
    """`text` without a suffix that could be the start of `marker` (it may complete later)."""
    for k in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:k]):
            return text[:-k]
    return text


def scan_call_object(text: str, pos: int, final: bool) -> tuple[CallSnapshot, int | None]:
    """A `{"name": ..., "arguments"|"parameters": {...}}` object at `pos`: the call so far and
    the object's end (None while unfinished). Raises Malformed."""
    if pos < len(text) and text[pos] != "{":
        raise Malformed("a tool call must be a JSON object")
    scan = scan_value(text, pos)
    members = scan.members
    arguments_member = members.get("arguments") or members.get("parameters")
    if scan.end is None:
        if final:
            raise Malformed("the tool call's JSON is unfinished")
        name_member = members.get("name")
        name = None
        if name_member is not None and name_member.value_end is not None:
            name = json.loads(text[name_member.value_start:name_member.value_end])
            if not isinstance(name, str):
                raise Malformed("the tool call's name is not a string")
        arguments = ""
        if arguments_member is not None and text.startswith("{", arguments_member.value_start):
            arguments = text[arguments_member.value_start:arguments_member.value_end or len(text)]
        return CallSnapshot(name, arguments, False), None
    return _finished_call(text, pos, scan.end, arguments_member), scan.end


def _finished_call(text: str, pos: int, end: int, arguments_member) -> CallSnapshot:
    try:
        obj = json.loads(text[pos:end])
    except ValueError as exc:
        raise Malformed(f"the tool call is not valid JSON: {exc}") from None
    if not isinstance(obj.get("name"), str):
        raise Malformed("the tool call has no name")
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        return CallSnapshot(obj["name"], checked_arguments(arguments), True)
    if not isinstance(arguments, dict):
        raise Malformed("the tool call's arguments are not an object")
    raw = text[arguments_member.value_start:arguments_member.value_end] if arguments_member else "{}"
    return CallSnapshot(obj["name"], raw, True)


def checked_arguments(raw: str) -> str:
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise Malformed(f"the arguments are not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise Malformed("the arguments are not a JSON object")
    return raw


def mistral_call_id() -> str:
    """Mistral's templates require call ids of 9 letters and digits."""
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(9))
