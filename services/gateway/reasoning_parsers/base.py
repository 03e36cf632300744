"""The one interface of the reasoning parsers: split `<think>...</think>` from the answer.

The output is in one of two states, reasoning or content, and moves from the first to the
second once, at the end tag. A parser says how an output starts: in reasoning (the prompt
already opened the think block, as DeepSeek-R1's and Qwen3-thinking templates do, or the
model opens it with the start tag) or in content. The tags themselves are never shown.
Streaming holds back text that may be the start of a tag, so the streamed reasoning and
content add up to the whole-output split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from splitserve.services.gateway.tool_parsers.base import hold_marker_prefix

START, END = "<think>", "</think>"


@dataclass
class ReasoningDelta:
    reasoning: str = ""
    content: str = ""


class ReasoningParser:
    """Subclasses set `name` and `reasoning_without_start_tag`."""

    name: ClassVar[str]
    reasoning_without_start_tag: ClassVar[bool]
    """Whether an output that does not open with <think> is reasoning until </think>."""

    def starts_in_reasoning(self, prompt_text: str) -> bool | None:
        """True/False when the output's first state is known, None: decided by its first characters."""
        if prompt_text.rstrip().endswith(START) or self.reasoning_without_start_tag:
            return True
        return None


class ReasoningStream:
    """Feed text deltas; get reasoning and content deltas. `split(text)` for a whole output."""

    def __init__(self, parser: ReasoningParser, prompt_text: str = "") -> None:
        self.in_reasoning = parser.starts_in_reasoning(prompt_text)
        self.reasoned = bool(self.in_reasoning)  # whether the output had a reasoning part
        self._opening = True  # the first characters may still be the start tag
        self._pending = ""

    def feed(self, text: str, final: bool = False) -> ReasoningDelta:
        self._pending += text
        if self._opening and not self._strip_start_tag(final):
            return ReasoningDelta()
        if not self.in_reasoning:
            out, self._pending = self._pending, ""
            return ReasoningDelta(content=out)
        end = self._pending.find(END)
        if end < 0:
            out = self._pending if final else hold_marker_prefix(self._pending, END)
            self._pending = self._pending[len(out):]
            return ReasoningDelta(reasoning=out)
        reasoning, rest = self._pending[:end], self._pending[end + len(END):]
        self.in_reasoning, self._pending = False, ""
        return ReasoningDelta(reasoning, rest)

    def finish(self) -> ReasoningDelta:
        return self.feed("", final=True)

    def _strip_start_tag(self, final: bool) -> bool:
        """Drop a leading <think> (entering reasoning); False while the start is undecided."""
        head = self._pending.lstrip()
        if head.startswith(START):
            self.in_reasoning, self.reasoned, self._pending = True, True, head[len(START):]
        elif START.startswith(head) and not final:
            return False  # nothing yet, or part of the start tag
        self._opening = False
        self.in_reasoning = bool(self.in_reasoning)
        return True


def split_reasoning(parser: ReasoningParser, text: str, prompt_text: str = "") -> tuple[str | None, str]:
    """(reasoning, or None if the output had no reasoning part; content) of a whole output."""
    stream = ReasoningStream(parser, prompt_text)
    delta = stream.feed(text, final=True)
    return (delta.reasoning if stream.reasoned else None), delta.content
