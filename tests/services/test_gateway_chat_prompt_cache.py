"""The chat prompt cache's ids equal the full render + tokenization's, whatever the conversation.

Real tokenizers (`tokenizers` + PreTrainedTokenizerFast, tests/services/chat_tokenizers.py) with
their chat templates; random multi-turn conversations from hypothesis, with tool calls and results,
text that spells special tokens, edits of earlier messages and changed tools between turns.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from tokenizers import AddedToken, Tokenizer
from transformers import PreTrainedTokenizerFast

from chat_tokenizers import (
    demo_tokenizer, metaspace_tokenizer, prepend_normalizer_tokenizer, qwen_style_tokenizer, stripping_tokenizer)
from scripted_tools import ASK, MODEL, TOOLS, client as _client
from splitserve.services.gateway.chat_prompt_cache import ChatPromptCache
from splitserve.services.gateway.chat_split_rule import split_rule_failure, split_token_ids
from splitserve.services.gateway.config import RequestLimits
from splitserve.services.gateway.prepare import PrepareContext, prepare_chat
from splitserve.services.gateway.request_models import ChatCompletionRequest

TOKENIZERS = {"demo": demo_tokenizer, "qwen-style": qwen_style_tokenizer, "metaspace": metaspace_tokenizer,
              "prepend-normalizer": prepend_normalizer_tokenizer, "stripping": stripping_tokenizer}
TOOL = {"type": "function", "function": {"name": "run", "description": "Run a shell command.",
                                         "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}}}}

_PIECES = ["a", "b", "é", "e\u0301", " ", "  ", "\n", "\t", "42", ".", "<", "|", " word", "\u2581x",
           "<|im_end|>", "<|end|>", "<|user|>", "</s>", "<tool_call>", " \n "]  # some spell special tokens
_text = st.lists(st.sampled_from(_PIECES), max_size=10).map("".join)


@st.composite
def _exchange(draw, turn: int) -> list[dict]:
    """A user message and the answer to it: plain, or a tool call and its result(s) first."""
    messages = [{"role": "user", "content": draw(_text)}]
    if draw(st.booleans()):
        calls = [{"id": f"c{turn}{i}", "type": "function", "function": {"name": "run", "arguments": '{"cmd": "ls"}'}}
                 for i in range(draw(st.integers(1, 2)))]
        messages.append({"role": "assistant", "content": draw(st.sampled_from(["", "ok"])), "tool_calls": calls})
        messages += [{"role": "tool", "tool_call_id": c["id"], "content": draw(_text)} for c in calls]
    return messages + [{"role": "assistant", "content": draw(_text)}]


def _edited(content: str):
    """Another text, of the same length (the split tokens after it stay where they were) or not."""
    same_length = "".join("b" if c == "a" else "a" for c in content)
    return st.sampled_from([same_length or "a", "!" + content, content[1:]]).filter(lambda t: t != content)


@st.composite
def _session(draw) -> list[tuple[list[dict], list | None, bool]]:
    """Turns of one session: (messages, tools, add_generation_prompt); each turn usually extends the
    last, sometimes edits an earlier message or changes the tools."""
    messages = [{"role": "system", "content": draw(_text)}] if draw(st.booleans()) else []
    tools = [TOOL] if draw(st.booleans()) else None
    turns = []
    for turn in range(draw(st.integers(1, 5))):
        messages = messages + draw(_exchange(turn))
        if draw(st.integers(0, 4)) == 0:  # an edit of an earlier message: the cache must not reuse past it
            index = draw(st.integers(0, len(messages) - 1))
            messages[index] = {**messages[index], "content": draw(_edited(messages[index]["content"]))}
        if draw(st.integers(0, 5)) == 0:
            tools = None if tools else [TOOL]
        turns.append((messages[:-1], tools, draw(st.booleans())))
    return turns


def _render(tokenizer, messages, tools, add_generation_prompt) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt)


def _shared_tokens(tokenizer, old: str, new: str) -> int:
    """Tokens of the full tokenization of `new` that lie in the prefix it shares with `old`."""
    shared = len(os.path.commonprefix([old, new]))
    encoding = tokenizer.backend_tokenizer.encode(new, add_special_tokens=False)
    return sum(1 for _, end in encoding.offsets if end <= shared)


@pytest.mark.parametrize("name", list(TOKENIZERS))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(session=_session())
def test_cached_ids_equal_the_full_tokenization(name, session):
    tokenizer = TOKENIZERS[name]()
    cache = ChatPromptCache.for_tokenizer(tokenizer)
    assert cache.enabled
    previous = ""
    for messages, tools, add_generation_prompt in session:
        text = _render(tokenizer, messages, tools, add_generation_prompt)
        ids, num_reused = cache.encode_reusing("s", text)
        assert ids == tokenizer.encode(text, add_special_tokens=False)
        assert num_reused <= _shared_tokens(tokenizer, previous, text)
        previous = text


@pytest.mark.parametrize("name", ["demo", "qwen-style"])
def test_a_next_turn_reuses_the_history_and_tokenizes_only_its_tail(name):
    tokenizer = TOKENIZERS[name]()
    cache = ChatPromptCache.for_tokenizer(tokenizer)
    history = [{"role": "user", "content": "list the files " * 50}, {"role": "assistant", "content": "a.py b.py " * 50}]
    first = cache.encode("s", _render(tokenizer, history[:1], [TOOL], True))
    text = _render(tokenizer, history + [{"role": "user", "content": "and now?"}], [TOOL], True)
    ids, num_reused = cache.encode_reusing("s", text)
    assert ids == tokenizer.encode(text, add_special_tokens=False)
    last_split = max(i for i, t in enumerate(first) if t in split_token_ids(tokenizer))
    assert num_reused == last_split > len(first) - 8  # the first prompt up to its generation prompt's role token


def test_unkeyed_requests_and_other_keys_are_tokenized_whole():
    tokenizer = qwen_style_tokenizer()
    cache = ChatPromptCache.for_tokenizer(tokenizer)
    text = _render(tokenizer, ASK, None, True)
    cache.encode("a", text)
    assert cache.encode_reusing(None, text)[1] == 0 and cache.encode_reusing("b", text)[1] == 0
    assert len(cache) == 2 and cache.encode_reusing("a", text + "<|im_start|>")[1] > 0


def _qwen_backend() -> Tokenizer:
    """A copy of the Qwen-style tokenizer's backend (the variants below must not change the shared one)."""
    return Tokenizer.from_str(qwen_style_tokenizer().backend_tokenizer.to_str())


def _with_overlapping_tokens():
    backend = _qwen_backend()
    backend.add_special_tokens([AddedToken("<|im_end|>\n", normalized=False, special=True)])
    return PreTrainedTokenizerFast(tokenizer_object=backend)


class _OwnEncode(PreTrainedTokenizerFast):
    def encode(self, text, **kwargs):  # a model-specific class with its own encode
        return super().encode(text.strip(), **kwargs)


@pytest.mark.parametrize("build,reason", [
    (_with_overlapping_tokens, "contains another added token"),
    (lambda: PreTrainedTokenizerFast(tokenizer_object=_qwen_backend(), split_special_tokens=True), "split_special_tokens"),
    (lambda: _OwnEncode(tokenizer_object=_qwen_backend()), "overrides encode"),
])
def test_the_cache_turns_itself_off_where_the_split_rule_does_not_hold(build, reason):
    tokenizer = build()
    assert reason in split_rule_failure(tokenizer)
    cache = ChatPromptCache.for_tokenizer(tokenizer)
    assert not cache.enabled
    text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    for _ in range(2):
        assert cache.encode_reusing("s", text) == (tokenizer.encode(text, add_special_tokens=False), 0)
    assert len(cache) == 0


def test_the_table_is_bounded_by_sessions_and_bytes():
    tokenizer = demo_tokenizer()
    texts = [_render(tokenizer, [{"role": "user", "content": f"turn {i} " * 20}], None, True) for i in range(30)]
    by_count = ChatPromptCache.for_tokenizer(tokenizer, max_sessions=5)
    for i, text in enumerate(texts):
        by_count.encode(f"k{i}", text)
    assert len(by_count) == 5 and by_count.encode_reusing("k29", texts[29])[1] > 0
    assert by_count.encode_reusing("k0", texts[0])[1] == 0  # the oldest went first
    by_bytes = ChatPromptCache.for_tokenizer(tokenizer, max_bytes=3000)
    for i, text in enumerate(texts):
        by_bytes.encode(f"k{i}", text)
        assert by_bytes.num_bytes <= 3000
    assert 0 < len(by_bytes) < 30
    by_bytes.encode("k29", texts[29] * 20)  # larger than the whole table: not kept, nor its old entry
    assert by_bytes.encode_reusing("k29", texts[29])[1] == 0


def test_threads_sharing_a_cache_get_the_full_ids():
    tokenizer = qwen_style_tokenizer()
    cache = ChatPromptCache.for_tokenizer(tokenizer)
    turns = [[{"role": "user", "content": f"step {i} " * (i + 1)}, {"role": "assistant", "content": f"done {i}"}]
             for i in range(12)]
    texts = [_render(tokenizer, [m for turn in turns[:n] for m in turn], [TOOL], True) for n in range(1, 13)]

    def run(key_and_text):
        return cache.encode(*key_and_text)

    jobs = [(f"k{j % 3}", texts[(j * 5) % 12]) for j in range(120)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, jobs))
    assert results == [tokenizer.encode(text, add_special_tokens=False) for _, text in jobs]


def test_prepare_chat_with_and_without_the_cache():
    tokenizer = qwen_style_tokenizer()
    cache = ChatPromptCache.for_tokenizer(tokenizer)
    plain = PrepareContext(tokenizer, 1 << 16, RequestLimits(), 8)
    cached = PrepareContext(tokenizer, 1 << 16, RequestLimits(), 8, chat_prompts=cache)
    messages = list(ASK)
    for turn in range(3):
        body = ChatCompletionRequest(model="m", messages=messages, prompt_cache_key="agent-1")
        assert prepare_chat(body, cached).prompts == prepare_chat(body, plain).prompts
        messages = messages + [{"role": "assistant", "content": f"answer {turn}"}, {"role": "user", "content": "more"}]
    assert len(cache) == 1


def test_keyed_turns_through_the_gateway_reach_the_worker_as_full_tokenizations(scripted_stack):
    gateway, worker, tokenizer = scripted_stack
    client = _client(gateway)
    messages = list(ASK)
    for turn in range(3):
        client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS,
                                       extra_body={"prompt_cache_key": "chat-prompt-cache-test"})
        expected = tokenizer.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=True, tokenize=False)
        assert list(worker.record.generates[-1].prompt_token_ids) == tokenizer.encode(expected, add_special_tokens=False)
        messages += [{"role": "assistant", "content": f"It is {turn}."}, {"role": "user", "content": "And tomorrow?"}]
