"""The endpoints around generation, shaped as vLLM's so its clients find them:

    GET  /v1/models, GET /v1/models/{model}     model cards (vLLM's fields: root, parent, permission)
    POST /tokenize   {prompt | messages}         -> {count, max_model_len, tokens, token_strs}
    POST /detokenize {tokens}                    -> {prompt}
    GET  /version                                -> {version}
    GET|POST /ping                               -> 200, empty (SageMaker-style liveness, as vLLM)

`model` is optional in the tokenizer endpoints (the served model); another name is a 404.
Tokenizing runs on the gateway's tokenizer thread, like a generation request's.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response
from splitserve import __version__
from splitserve.services.gateway.openai_protocol import bad_request, model_not_found
from splitserve.services.gateway.request_models import ChatMessage, OpenAIModel
from splitserve.shared.tokenizer import apply_chat_template


class TokenizeRequest(OpenAIModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    """Default: true for a prompt, false for messages (the chat template writes them), as vLLM."""
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[int]


def add_utility_routes(app: FastAPI, state: Any) -> None:
    """`state` is the app's GatewayState."""

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        names = (state.config.served_model_name, *state.config.served_model_aliases)
        return {"object": "list", "data": [_model_card(state, name) for name in names]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        if model != state.config.served_model_name and model not in state.config.served_model_aliases:
            raise model_not_found(model)
        return _model_card(state, model)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        state.resolve_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("give exactly one of prompt and messages", "prompt")
        ids = await _in_tokenizer_thread(state, _token_ids, body, state.tokenizer)
        strs = state.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": state.max_model_len(), "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        state.resolve_model(body.model)
        vocab_size = len(state.tokenizer)
        bad = [t for t in body.tokens if not 0 <= t < vocab_size]
        if bad:
            raise bad_request(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})", "tokens")
        text = await _in_tokenizer_thread(state, state.tokenizer.decode, body.tokens)
        return {"prompt": text}

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping() -> Response:
        return Response(status_code=200)


def _model_card(state: Any, name: str) -> dict[str, Any]:
    created = int(time.time())
    return {"id": name, "object": "model", "created": created, "owned_by": "splitserve",
            "root": state.config.model_dir, "parent": None,
            "max_model_len": state.config.max_model_len or state.router.max_model_len(),
            "permission": [{"id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission", "created": created,
                            "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                            "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                            "organization": "*", "group": None, "is_blocking": False}]}


def _token_ids(body: TokenizeRequest, tokenizer: Any) -> list[int]:
    if body.messages is not None:
        if not body.messages:
            raise bad_request("messages must not be empty", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        if not body.add_special_tokens:
            return apply_chat_template(tokenizer, messages, add_generation_prompt=body.add_generation_prompt)
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=body.add_generation_prompt)
        return list(tokenizer.encode(text, add_special_tokens=True))
    special = True if body.add_special_tokens is None else body.add_special_tokens
    return list(tokenizer.encode(body.prompt, add_special_tokens=special))


async def _in_tokenizer_thread(state: Any, fn, *args):
    return await asyncio.get_running_loop().run_in_executor(state.tokenize_pool, fn, *args)
