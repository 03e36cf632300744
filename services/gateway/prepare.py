"""OpenAI request -> validated prompts (token ids) and `SamplingParams`, or a 400 naming the problem.

    unsupported fields, request limits   before any tokenization (RequestLimits, request_models)
    prompts                              token ids as given, or text tokenized; text so long that its
                                         length alone proves it cannot fit the context is refused
                                         without tokenizing it
    chat                                 messages -> chat template -> token ids
    SamplingParams                       the table's fields by name (shared/sampling_params.py)
    context                              the prompt leaves room, max_tokens <= max_model_len (prompt +
                                         max_tokens past it stops at the context's end, as vLLM),
                                         token ids in the vocabulary
    vLLM's extras                        max_tokens 16 for completions, echo, best_of, X-Request-Id

Runs on a tokenizer thread, not the event loop (app.py). Torch-free.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from splitserve.services.gateway.chat_output import OutputSpec
from splitserve.services.gateway.chat_prompt_cache import ChatPromptCache
from splitserve.services.gateway.chat_tools import (
    ToolUse, check_template_renders_tools, constrained, resolve_tool_use, template_messages)
from splitserve.services.gateway.config import AgentApiConfig, RequestLimits
from splitserve.services.gateway.openai_protocol import bad_request
from splitserve.services.gateway.reasoning_parsers import REASONING_PARSERS
from splitserve.services.gateway.structured_outputs import spec_depth, spec_size_bytes, structured_outputs_spec
from splitserve.services.gateway.request_models import (
    RETENTION_S, ChatCompletionRequest, CompletionRequest, GenerationFields, unsupported_field)
from splitserve.shared.request import SessionHint
from splitserve.shared.sampling_params import SamplingParams, sampling_fields
from splitserve.shared.structured_outputs import StructuredOutputsParams
from splitserve.shared.tokenizer import render_chat_prompt, reserved_template_kwargs

# A token's text is at most its vocabulary entry's length (byte-level BPE: one character per byte;
# SentencePiece: one per character); the margin covers normalizers that merge characters.
_CHARS_PER_TOKEN_MARGIN = 4


@dataclass(frozen=True)
class PrepareContext:
    tokenizer: Any
    max_model_len: int
    limits: RequestLimits
    max_token_chars: int
    """The longest vocabulary entry, in characters (`longest_token_chars`)."""
    agent_api: AgentApiConfig = field(default_factory=AgentApiConfig)
    """Tool and reasoning parsers."""
    chat_prompts: ChatPromptCache | None = None
    """Keyed sessions' last chat prompts (None: every chat prompt is tokenized whole)."""

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def max_prompt_chars(self) -> int:
        """Text longer than this has more than max_model_len tokens, whatever it says."""
        return self.max_model_len * self.max_token_chars * _CHARS_PER_TOKEN_MARGIN


def longest_token_chars(tokenizer: Any) -> int:
    return max((len(token) for token in tokenizer.get_vocab()), default=1)


@dataclass
class PreparedRequest:
    """A validated request, ready to run: `prompts` x `n` choices with one set of params."""

    kind: str
    """'completion' or 'chat'."""
    request_id: str
    model: str
    prompts: list[list[int]]
    params: SamplingParams
    stream: bool
    include_usage: bool
    priority: int = 0
    output: OutputSpec = field(default_factory=OutputSpec)
    """How a chat choice's text is read (reasoning, tool calls)."""
    session: SessionHint | None = None
    """prompt_cache_key and its retention (see request_models.RETENTION_S)."""
    return_token_ids: bool = False
    response_role: str = "assistant"
    """Chat: the role of the answer (the last message's without a generation prompt, as vLLM)."""
    echo_texts: list[str] | None = None
    """Completions with echo: each prompt's text, returned before its completion."""
    echo_only: bool = False
    """echo with max_tokens 0: one token is generated but neither returned nor counted (vLLM counts it)."""
    continuous_usage: bool = False
    """stream_options.continuous_usage_stats: each chunk carries its choice's usage so far (vLLM's)."""
    best_of_n: int | None = None
    """best_of > n: `params.n` candidates run per prompt and the best `best_of_n` are returned."""
    worker_request_id: str = ""
    """Base of the worker requests' ids (unique even when clients reuse an X-Request-Id)."""
    created: int = field(default_factory=lambda: int(time.time()))
    arrival_s: float = field(default_factory=time.monotonic)

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.params.n


DEFAULT_COMPLETION_MAX_TOKENS = 16
"""OpenAI's and vLLM's max_tokens for a completion that gives none (chat: up to the context)."""


def prepare_completion(body: CompletionRequest, ctx: PrepareContext) -> PreparedRequest:
    check_request(body, ctx)
    prompts = _completion_prompts(body.prompt, ctx, body.add_special_tokens)
    truncated = truncate_prompts(prompts, body.truncate_prompt_tokens, ctx.max_model_len)
    max_tokens = DEFAULT_COMPLETION_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    if max_tokens == 0 and not body.echo:
        raise bad_request("max_tokens must be at least 1, got 0 (0 is only allowed with echo)", "max_tokens")
    if body.prompt_logprobs is not None and body.stream:
        raise bad_request("prompt_logprobs are not available when streaming (use echo with logprobs)", "prompt_logprobs")
    # vLLM: echo with logprobs returns the prompt's logprobs too.
    prompt_logprobs = body.prompt_logprobs if body.prompt_logprobs is not None else body.logprobs if body.echo else None
    params = _sampling_params(body, ctx.limits, max(max_tokens, 1), body.logprobs, prompt_logprobs=prompt_logprobs)
    prep = _prepared("completion", "cmpl", body, prompts, params, ctx)
    if body.echo:
        prep.echo_texts = _prompt_texts(body.prompt if not truncated else prompts, prompts, ctx.tokenizer)
        prep.echo_only = max_tokens == 0
    _apply_best_of(prep, body.best_of, body.stream, ctx.limits.max_n)
    return prep


def _prompt_texts(prompt: str | list, prompts: list[list[int]], tokenizer: Any) -> list[str]:
    """The text echoed for each prompt: as given, or its tokens decoded."""
    given = [prompt] if isinstance(prompt, str) else prompt
    if len(given) != len(prompts):  # one prompt of token ids
        given = [None]
    return [p if isinstance(p, str) else tokenizer.decode(ids, skip_special_tokens=False)
            for p, ids in zip(given, prompts)]


def _apply_best_of(prep: PreparedRequest, best_of: int | None, stream: bool, max_n: int) -> None:
    """best_of > n runs best_of candidates. Below n, or greedy (every candidate is the same), there
    is nothing to choose and n choices come back, as vLLM 0.32 answers."""
    if best_of is None or best_of <= prep.params.n or prep.params.greedy:
        return
    if stream:
        raise bad_request("best_of cannot be used with stream: the best choices are known only at the end", "best_of")
    _at_most("best_of", best_of, max_n, "--max-n")
    prep.best_of_n = prep.params.n
    prep.params = replace(prep.params, n=best_of)


MAX_CLIENT_REQUEST_ID_CHARS = 256


def name_after_client(prep: PreparedRequest, client_request_id: str | None) -> None:
    """vLLM names the response after the client's X-Request-Id; worker ids stay unique regardless.
    The id travels into every worker's logs, traces and KV messages, so its length is bounded."""
    if client_request_id and len(client_request_id) > MAX_CLIENT_REQUEST_ID_CHARS:
        raise bad_request(f"X-Request-Id: at most {MAX_CLIENT_REQUEST_ID_CHARS} characters, got {len(client_request_id)}",
                          "X-Request-Id")
    if client_request_id:
        prep.request_id = f"{prep.request_id.split('-', 1)[0]}-{client_request_id}"
        prep.worker_request_id = f"{prep.request_id}-{uuid.uuid4().hex[:8]}"


def prepare_chat(body: ChatCompletionRequest, ctx: PrepareContext) -> PreparedRequest:
    check_request(body, ctx)
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
    use = resolve_tool_use(body, ctx.agent_api)
    if use.constraint is not None:  # the tools' schemas: a 400 about it names `tools`
        use.constraint = replace(use.constraint, param="tools")
        check_structured_outputs(use.constraint, ctx.limits)
    if use.tools:
        check_template_renders_tools(ctx.tokenizer)
    # `name` goes to the template as vLLM passes it (templates that have no use for it skip it).
    messages = template_messages(body.messages)
    _check_text_length(sum(len(m["content"]) for m in messages), ctx, "messages")
    _check_template_options(body, ctx.tokenizer)
    try:
        prompt_text = render_chat_prompt(ctx.tokenizer, messages, body.add_generation_prompt, use.tools,
                                         body.continue_final_message, body.chat_template_kwargs)
    except Exception as exc:  # jinja errors of a template that rejects these messages
        raise bad_request(f"cannot apply the chat template: {exc}", "messages") from None
    prompts = [_chat_prompt_ids(prompt_text, body.prompt_cache_key, ctx, body.add_special_tokens)]
    truncate_prompts(prompts, body.truncate_prompt_tokens, ctx.max_model_len)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = _sampling_params(body, ctx.limits, max_tokens, logprobs)
    output = _output_spec(use, ctx.agent_api, prompt_text)
    if getattr(output.tool_parser, "keeps_special_tokens", False):
        params.skip_special_tokens = False  # the call markers are special tokens
    prep = _prepared("chat", "chatcmpl", body, prompts, constrained(params, use), ctx)
    prep.output = output
    prep.response_role = "assistant" if body.add_generation_prompt else body.messages[-1].role
    return prep


def _check_template_options(body: ChatCompletionRequest, tokenizer: Any) -> None:
    """vLLM's rules: continue_final_message leaves the last message open, so no generation prompt
    may follow it; a template variable may not shadow a parameter of the render itself."""
    if body.continue_final_message and body.add_generation_prompt:
        raise bad_request("continue_final_message and add_generation_prompt cannot both be true "
                          "(send add_generation_prompt: false)", "continue_final_message")
    reserved = sorted(set(body.chat_template_kwargs) & reserved_template_kwargs(tokenizer)) if (
        body.chat_template_kwargs) else []  # the render's signature is read only when there are variables
    if reserved:
        raise bad_request(f"chat_template_kwargs: {reserved[0]!r} is set by the request itself, not a template "
                          "variable", "chat_template_kwargs")


def _chat_prompt_ids(prompt_text: str, key: str | None, ctx: PrepareContext, add_special_tokens: bool = False
                     ) -> list[int]:
    """The template writes the special tokens it wants; `add_special_tokens` adds the tokenizer's too."""
    if ctx.chat_prompts is None or add_special_tokens:
        return list(ctx.tokenizer.encode(prompt_text, add_special_tokens=add_special_tokens))
    return ctx.chat_prompts.encode(key, prompt_text)


def _output_spec(use: ToolUse, config: AgentApiConfig, prompt_text: str) -> OutputSpec:
    reasoning = REASONING_PARSERS[config.reasoning_parser]() if config.reasoning_parser else None
    return OutputSpec(use.parser, use.max_calls, reasoning, prompt_text)


def text_chars(body: CompletionRequest | ChatCompletionRequest) -> int:
    """Characters of text the request would have tokenized (app.py picks a tokenizer thread by it)."""
    if isinstance(body, ChatCompletionRequest):
        return sum(len(m.text()) for m in body.messages)
    if isinstance(body.prompt, str):
        return len(body.prompt)
    if body.prompt and not isinstance(body.prompt[0], str):  # token ids: nothing to tokenize
        return 0
    return sum(len(p) for p in body.prompt)


# ---- checks before tokenizing ------------------------------------------------------------------

def check_request(body: GenerationFields, ctx: PrepareContext) -> None:
    """400 for a field this server does not implement or a value past a limit."""
    unsupported = unsupported_field(body)
    if unsupported is not None:
        raise bad_request(unsupported[1], unsupported[0])
    limits = ctx.limits
    _at_most("n", body.n or 1, limits.max_n, "--max-n")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    _at_most("stop", len(stops), limits.max_stop_sequences, "--max-stop-sequences", "stop sequences")
    for stop in stops:
        _at_most("stop", len(stop), limits.max_stop_sequence_chars, "--max-stop-sequence-chars",
                 "characters in a stop sequence")
    _at_most("stop_token_ids", len(body.stop_token_ids or ()), limits.max_stop_token_ids, "--max-stop-token-ids",
             "token ids")
    bias = body.logit_bias or {}
    _at_most("logit_bias", len(bias), limits.max_logit_bias_tokens, "--max-logit-bias-tokens", "token ids")
    _in_vocabulary("logit_bias", bias, ctx.vocab_size)
    _in_vocabulary("stop_token_ids", body.stop_token_ids or (), ctx.vocab_size)


def check_structured_outputs(spec: StructuredOutputsParams | None, limits: RequestLimits) -> None:
    """400 for a spec past the size or nesting limits, before any worker compiles it: a compile
    cannot be stopped once begun, and a schema nested a few hundred deep takes a compile thread
    for tens of seconds (RequestLimits)."""
    if spec is None:
        return
    param = spec.param or "structured_outputs"
    what = "JSON schema" if spec.kind == "json" else spec.kind
    _at_most(param, spec_size_bytes(spec), limits.max_structured_outputs_bytes, "--max-structured-outputs-bytes",
             f"bytes of {what}")
    try:
        depth = spec_depth(spec)
    except ValueError as exc:
        raise bad_request(str(exc), param) from None
    _at_most(param, depth, limits.max_structured_outputs_depth, "--max-structured-outputs-depth",
             "levels of JSON nesting")


def _in_vocabulary(param: str, token_ids, vocab_size: int) -> None:
    """400 for an id no output can hold (a stop id there would never match, a bias never apply)."""
    outside = [t for t in token_ids if t >= vocab_size]
    if outside:
        raise bad_request(f"{param}: token id {outside[0]} is outside the vocabulary [0, {vocab_size})", param)


def _at_most(param: str, value: int, limit: int, flag: str, what: str = "") -> None:
    if value > limit:
        what = f" {what}" if what else ""
        raise bad_request(f"{param}: at most {limit}{what} allowed ({flag}), got {value}", param)


def _check_text_length(num_chars: int, ctx: PrepareContext, param: str) -> None:
    if num_chars > ctx.max_prompt_chars():
        raise bad_request(
            f"This model's maximum context length is {ctx.max_model_len} tokens, and {num_chars} characters of "
            f"{param} are more than that many tokens of this tokenizer can hold. Shorten the {param}.", param)


# ---- prompts and params ------------------------------------------------------------------------

def truncate_prompts(prompts: list[list[int]], keep: int | None, max_model_len: int) -> bool:
    """vLLM's truncate_prompt_tokens: each prompt keeps its last `keep` tokens (-1: the context
    length) in place; whether any was cut."""
    if keep is None:
        return False
    keep = max_model_len if keep == -1 else keep
    if keep > max_model_len:
        raise bad_request(f"truncate_prompt_tokens: at most the context length {max_model_len}, got {keep}",
                          "truncate_prompt_tokens")
    if keep == 0:
        raise bad_request("truncate_prompt_tokens: 0 would leave no prompt", "truncate_prompt_tokens")
    cut = [i for i, prompt in enumerate(prompts) if len(prompt) > keep]
    for i in cut:
        prompts[i] = prompts[i][-keep:]
    return bool(cut)


def _completion_prompts(prompt: str | list, ctx: PrepareContext, add_special_tokens: bool = True) -> list[list[int]]:
    """str | list[str] | list[int] | list[list[int]] -> token ids of each prompt."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise bad_request("prompt must not be empty", "prompt")
    if all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    _at_most("prompt", len(prompt), ctx.limits.max_prompts_per_request, "--max-prompts-per-request", "prompts")
    for p in prompt:
        if isinstance(p, str):
            _check_text_length(len(p), ctx, "prompt")
    prompts = []
    for p in prompt:
        ids = list(ctx.tokenizer.encode(p, add_special_tokens=add_special_tokens)) if isinstance(p, str) else list(p)
        if not ids:
            raise bad_request("prompt must not be empty", "prompt")
        prompts.append(ids)
    return prompts


def _sampling_params(body: GenerationFields, limits: RequestLimits, max_tokens: int | None, logprobs: int | None,
                     **endpoint_fields: Any) -> SamplingParams:
    """Every sampling field the request set (null: the dataclass default), by its table name;
    `endpoint_fields`: the fields an endpoint maps itself (openai=False in the table)."""
    given = {name: getattr(body, name) for name, _ in sampling_fields(openai=True)}
    given = {name: value for name, value in given.items() if value is not None}
    spec = structured_outputs_spec(body)
    check_structured_outputs(spec, limits)
    try:
        return SamplingParams(**{**given, "max_tokens": max_tokens, "logprobs": logprobs, **endpoint_fields,
                                 "structured_outputs": spec})
    except ValueError as exc:
        raise bad_request(str(exc), str(exc).split(" ", 1)[0]) from None


def _prepared(kind: str, id_prefix: str, body: GenerationFields, prompts: list[list[int]], params: SamplingParams,
              ctx: PrepareContext) -> PreparedRequest:
    for prompt in prompts:
        check_prompt(prompt, params.max_tokens, ctx.max_model_len, ctx.vocab_size)
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options can only be given with stream=true", "stream_options")
    include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
    request_id = f"{id_prefix}-{uuid.uuid4().hex}"
    continuous_usage = include_usage and body.stream_options.continuous_usage_stats  # with include_usage, as vLLM
    return PreparedRequest(kind, request_id, body.model, prompts, params, body.stream, include_usage, body.priority,
                           worker_request_id=request_id, session=_session(body),
                           return_token_ids=body.return_token_ids, continuous_usage=continuous_usage)


def _session(body: GenerationFields) -> SessionHint | None:
    if body.prompt_cache_key is None:
        if body.prompt_cache_retention is not None:
            raise bad_request("prompt_cache_retention needs a prompt_cache_key: retention applies to a keyed "
                              "session's blocks", "prompt_cache_retention")
        return None
    return SessionHint(body.prompt_cache_key, RETENTION_S[body.prompt_cache_retention or "in_memory"])


def check_prompt(prompt: Sequence[int], max_tokens: int | None, max_model_len: int, vocab_size: int) -> None:
    """400 unless the prompt's tokens exist, the prompt leaves room for a token and max_tokens
    fits the context. Like vLLM, prompt + max_tokens past the context is no error: generation
    stops at the context's end (finish_reason "length")."""
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise bad_request(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab_size})", "prompt")
    if len(prompt) >= max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens, but the prompt has {len(prompt)} "
            f"tokens (at least one token must be generated). Shorten the prompt.", "prompt")
    if max_tokens is not None and max_tokens > max_model_len:
        raise bad_request(f"max_tokens={max_tokens} cannot be greater than this model's maximum context length "
                          f"({max_model_len} tokens). Request fewer output tokens.", "max_tokens")
