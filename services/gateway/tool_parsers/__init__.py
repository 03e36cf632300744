"""Tool-call parsers, chosen with `--tool-call-parser NAME` (vLLM's names)."""

from splitserve.services.gateway.tool_parsers.base import (
    ParsedDelta, ParsedOutput, ToolCall, ToolCallDelta, ToolCallStream, ToolParser, parse_output)
from splitserve.services.gateway.tool_parsers.hermes import HermesToolParser
from splitserve.services.gateway.tool_parsers.llama3_json import Llama3JsonToolParser
from splitserve.services.gateway.tool_parsers.mistral import MistralToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesToolParser, Llama3JsonToolParser, MistralToolParser)}

__all__ = ["TOOL_PARSERS", "ParsedDelta", "ParsedOutput", "ToolCall", "ToolCallDelta", "ToolCallStream",
           "ToolParser", "parse_output"]
