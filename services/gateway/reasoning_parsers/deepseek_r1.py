"""DeepSeek-R1: its template opens `<think>` in the prompt, so the output is reasoning up to
`</think>` (all of it if the tag never comes); a leading `<think>` from the model is dropped."""

from splitserve.services.gateway.reasoning_parsers.base import ReasoningParser


class DeepSeekR1ReasoningParser(ReasoningParser):
    name = "deepseek_r1"
    reasoning_without_start_tag = True
