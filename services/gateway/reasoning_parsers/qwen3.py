"""Qwen3: `<think>reasoning</think>answer`. Without an opening tag (thinking switched off, or a
non-thinking model) the output is content, unless the prompt itself opened `<think>` (the
Qwen3 thinking-2507 templates do)."""

from splitserve.services.gateway.reasoning_parsers.base import ReasoningParser


class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"
    reasoning_without_start_tag = False
