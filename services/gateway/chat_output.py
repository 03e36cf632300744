"""A chat choice's text read as reasoning, content and tool calls (whole, or delta by delta).

The reasoning parser runs first (the `<think>` block ends before any answer), then the tool
parser reads the answer, as in vLLM. Both are optional: without them the text is all content.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from splitserve.services.gateway.reasoning_parsers import ReasoningParser, ReasoningStream, split_reasoning
from splitserve.services.gateway.tool_parsers import ToolCall, ToolCallDelta, ToolCallStream, ToolParser, parse_output


@dataclass
class OutputSpec:
    """How to read one request's outputs."""

    tool_parser: Callable[[], ToolParser] | None = None
    max_calls: int | None = None
    reasoning_parser: ReasoningParser | None = None
    prompt_text: str = ""  # the rendered prompt: tells whether it opened a <think> block

    @property
    def parses(self) -> bool:
        return self.tool_parser is not None or self.reasoning_parser is not None


@dataclass
class ChatOutput:
    reasoning: str | None
    content: str | None
    tool_calls: list[ToolCall]


@dataclass
class ChatDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)


def parse_chat_output(spec: OutputSpec, text: str) -> ChatOutput:
    reasoning, content = (split_reasoning(spec.reasoning_parser, text, spec.prompt_text)
                          if spec.reasoning_parser is not None else (None, text))
    if spec.tool_parser is None:
        return ChatOutput(reasoning, content, [])
    parsed = parse_output(spec.tool_parser(), content, spec.max_calls)
    return ChatOutput(reasoning, parsed.content, parsed.tool_calls)


class ChatOutputStream:
    def __init__(self, spec: OutputSpec) -> None:
        self._reasoning = (ReasoningStream(spec.reasoning_parser, spec.prompt_text)
                           if spec.reasoning_parser is not None else None)
        self._tools = ToolCallStream(spec.tool_parser(), spec.max_calls) if spec.tool_parser is not None else None

    @property
    def has_tool_calls(self) -> bool:
        return self._tools is not None and bool(self._tools.call_ids)

    def feed(self, text: str, final: bool = False) -> ChatDelta:
        reasoning, content = "", text
        if self._reasoning is not None:
            split = self._reasoning.feed(text, final)
            reasoning, content = split.reasoning, split.content
        if self._tools is None:
            return ChatDelta(reasoning, content)
        parsed = self._tools.feed(content)
        if final:
            rest = self._tools.finish()
            parsed.content += rest.content
            parsed.tool_calls += rest.tool_calls
        return ChatDelta(reasoning, parsed.content, parsed.tool_calls)
