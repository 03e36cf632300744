"""vLLM's chat-template options on /v1/chat/completions: `chat_template_kwargs` reach the template
as variables (Qwen3's enable_thinking), `continue_final_message` leaves the last message open, and
both refuse what vLLM refuses — through prepare_chat, the gateway's own path from body to prompt."""

from __future__ import annotations

import copy

import pytest

from checkpoints import demo_tokenizer
from splitserve.services.gateway.config import RequestLimits
from splitserve.services.gateway.openai_protocol import APIError
from splitserve.services.gateway.prepare import PrepareContext, prepare_chat
from splitserve.services.gateway.request_models import ChatCompletionRequest

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
