"""Reasoning parsers, chosen with `--reasoning-parser NAME` (vLLM's names)."""

from splitserve.services.gateway.reasoning_parsers.base import (
    ReasoningDelta, ReasoningParser, ReasoningStream, split_reasoning)
from splitserve.services.gateway.reasoning_parsers.deepseek_r1 import DeepSeekR1ReasoningParser
from splitserve.services.gateway.reasoning_parsers.qwen3 import Qwen3ReasoningParser

REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    p.name: p for p in (Qwen3ReasoningParser, DeepSeekR1ReasoningParser)}

__all__ = ["REASONING_PARSERS", "ReasoningDelta", "ReasoningParser", "ReasoningStream", "split_reasoning"]
