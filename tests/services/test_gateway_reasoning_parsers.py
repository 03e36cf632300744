"""Reasoning parsers on recorded-style outputs, whole and streamed in random fragments."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from splitserve.services.gateway.reasoning_parsers import REASONING_PARSERS, ReasoningStream, split_reasoning

# (parser, prompt tail, output, reasoning, content)
SAMPLES = [
    ("qwen3", "<|im_start|>assistant\n", "<think>\nThe user asks 2+2. That is 4.\n</think>\n\nThe answer is 4.",
     "\nThe user asks 2+2. That is 4.\n", "\n\nThe answer is 4."),
    ("qwen3", "<|im_start|>assistant\n", "The answer is 4.", None, "The answer is 4."),  # enable_thinking=False
    ("qwen3", "<|im_start|>assistant\n<think>\n", "Simple sum.\n</think>\n\n4", "Simple sum.\n", "\n\n4"),
    ("qwen3", "", "<think>\nStill thinking when max_tokens hit", "\nStill thinking when max_tokens hit", ""),
    ("qwen3", "", "a </think> b", None, "a </think> b"),
    ("deepseek_r1", "<｜Assistant｜><think>\n", "Okay, so 2+2 is 4.\n</think>\n\n**4**",
     "Okay, so 2+2 is 4.\n", "\n\n**4**"),
    ("deepseek_r1", "<｜Assistant｜>", "<think>\nHmm.\n</think>The sum is 4.", "\nHmm.\n", "The sum is 4."),
    ("deepseek_r1", "", "no end tag at all", "no end tag at all", ""),
]


@pytest.mark.parametrize("name,prompt,text,reasoning,content", SAMPLES)
def test_whole_output(name, prompt, text, reasoning, content):
    assert split_reasoning(REASONING_PARSERS[name](), text, prompt) == (reasoning, content)


@settings(max_examples=40, deadline=None)
@given(sample=st.sampled_from(SAMPLES), cuts=st.lists(st.integers(1, 6), max_size=40))
def test_streamed_in_random_fragments_equals_whole(sample, cuts):
    name, prompt, text, reasoning, content = sample
    stream = ReasoningStream(REASONING_PARSERS[name](), prompt)
    got_reasoning, got_content, pos = "", "", 0
    for size in [*cuts, len(text)]:
        delta = stream.feed(text[pos:pos + size])
        pos += size
        got_reasoning, got_content = got_reasoning + delta.reasoning, got_content + delta.content
    delta = stream.finish()
    assert (got_reasoning + delta.reasoning, got_content + delta.content) == (reasoning or "", content)
