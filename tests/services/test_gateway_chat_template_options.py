"""vLLM's prompt options: on chat, `chat_template_kwargs` reach the template as variables (Qwen3's
enable_thinking) and `continue_final_message` leaves the last message open; on both endpoints
`add_special_tokens` (vLLM's defaults: on for completions, off for chat) and
`truncate_prompt_tokens`; each refusing what vLLM refuses — through prepare_chat and
prepare_completion, the gateway's own path from body to prompt."""

from __future__ import annotations

import copy

import pytest

from checkpoints import demo_tokenizer
from splitserve.services.gateway.config import RequestLimits
from splitserve.services.gateway.openai_protocol import APIError
from splitserve.services.gateway.prepare import PrepareContext, prepare_chat, prepare_completion
from splitserve.services.gateway.request_models import ChatCompletionRequest, CompletionRequest

TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}"
            "{% if not (continue_final_message and loop.last) %}<|end|>{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% if enable_thinking is defined and not enable_thinking %}"
            "<think></think>{% endif %}{% endif %}")
ASK = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def ctx():
    tokenizer = copy.deepcopy(demo_tokenizer())
    tokenizer.chat_template = TEMPLATE
    return PrepareContext(tokenizer, 1 << 12, RequestLimits(), 8)


def _prompt(ctx, **body) -> str:
    prep = prepare_chat(ChatCompletionRequest(model="m", messages=ASK, **body), ctx)
    return ctx.tokenizer.decode(prep.prompts[0])


def test_chat_template_kwargs_are_template_variables(ctx):
    assert _prompt(ctx).endswith("<|assistant|>")
    assert _prompt(ctx, chat_template_kwargs={"enable_thinking": False}).endswith("<|assistant|><think></think>")
    assert _prompt(ctx, chat_template_kwargs={"enable_thinking": True}).endswith("<|assistant|>")


@pytest.mark.parametrize("name", ["tools", "add_generation_prompt", "tokenize", "messages", "chat_template"])
def test_a_template_variable_may_not_shadow_the_render_s_own_parameters(ctx, name):
    with pytest.raises(APIError) as raised:
        _prompt(ctx, chat_template_kwargs={name: True})
    assert raised.value.param == "chat_template_kwargs" and repr(name) in raised.value.message


def test_continue_final_message_leaves_the_last_message_open_and_answers_in_its_role(ctx):
    body = dict(messages=[*ASK, {"role": "assistant", "content": "Once upon"}], add_generation_prompt=False,
                continue_final_message=True)
    prep = prepare_chat(ChatCompletionRequest(model="m", **body), ctx)
    assert ctx.tokenizer.decode(prep.prompts[0]).endswith("<|assistant|>Once upon")
    assert prep.response_role == "assistant"
    with pytest.raises(APIError) as raised:
        prepare_chat(ChatCompletionRequest(model="m", **{**body, "add_generation_prompt": True}), ctx)
    assert raised.value.param == "continue_final_message"


@pytest.fixture(scope="module")
def bos_ctx():
    """The demo tokenizer with a post-processor that puts BOS first, as Llama's does."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = copy.deepcopy(demo_tokenizer())
    tokenizer.chat_template = TEMPLATE
    bos = tokenizer.convert_tokens_to_ids("<s>")
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PrepareContext(tokenizer, 64, RequestLimits(), 8), bos


def test_add_special_tokens_follows_vllm_defaults_on_each_endpoint(bos_ctx):
    ctx, bos = bos_ctx
    completion = prepare_completion(CompletionRequest(model="m", prompt="hello world"), ctx).prompts[0]
    assert completion[0] == bos
    bare = prepare_completion(CompletionRequest(model="m", prompt="hello world", add_special_tokens=False), ctx)
    assert bare.prompts[0] == completion[1:]
    chat = prepare_chat(ChatCompletionRequest(model="m", messages=ASK), ctx).prompts[0]
    assert chat[0] != bos  # the template writes what it wants
    assert prepare_chat(ChatCompletionRequest(model="m", messages=ASK, add_special_tokens=True), ctx).prompts[0] == \
        [bos, *chat]


def test_truncate_prompt_tokens_keeps_each_prompt_s_last_tokens(bos_ctx):
    ctx, _ = bos_ctx
    long, short = list(range(100, 140)), [7, 8, 9]
    prep = prepare_completion(CompletionRequest(model="m", prompt=[long, short], truncate_prompt_tokens=10, max_tokens=4,
                                                echo=True), ctx)
    assert prep.prompts == [long[-10:], short]
    assert prep.echo_texts[0] == ctx.tokenizer.decode(long[-10:], skip_special_tokens=False)
    chat = prepare_chat(ChatCompletionRequest(model="m", messages=ASK, truncate_prompt_tokens=3), ctx).prompts[0]
    assert chat == prepare_chat(ChatCompletionRequest(model="m", messages=ASK), ctx).prompts[0][-3:]
    for keep, words in ((65, "at most the context length 64"), (0, "no prompt")):
        with pytest.raises(APIError) as raised:
            prepare_completion(CompletionRequest(model="m", prompt=short, truncate_prompt_tokens=keep), ctx)
        assert raised.value.param == "truncate_prompt_tokens" and words in raised.value.message
    full = prepare_completion(CompletionRequest(model="m", prompt=long + long, truncate_prompt_tokens=-1, max_tokens=None,
                                                echo=False), PrepareContext(ctx.tokenizer, 128, RequestLimits(), 8))
    assert full.prompts == [long + long]  # -1: the context length (128), longer than the prompt
