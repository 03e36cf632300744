"""The request pipeline: OpenAI request -> prompts + sampling params -> choices streamed as text.

    prepare_completion / prepare_chat   validate, tokenize (or take token ids), chat template,
                                        length check against max_model_len, SamplingParams
    stream_choices                      one worker request per (prompt, choice): n > 1 and prompt
                                        lists become parallel requests, merged as they produce
    ChoiceStream                        token chunks -> incremental text; stop strings end the
                                        choice (the worker call is cancelled, the stop string is
                                        never emitted)

Everything here is torch-free; workers see only token ids.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from splitserve.services.gateway.dispatch import Dispatcher
from splitserve.services.gateway.metrics import GatewayMetrics
from splitserve.services.gateway.openai_protocol import (
    ChatCompletionRequest, CompletionRequest, GenerationFields, bad_request, service_unavailable)
from splitserve.services.gateway.worker_client import WorkerRequest
from splitserve.shared.sampling_params import SamplingParams
from splitserve.shared.tokenizer import IncrementalDetokenizer, apply_chat_template


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
    created: int = field(default_factory=lambda: int(time.time()))
    arrival_s: float = field(default_factory=time.monotonic)

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.params.n


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class ChoiceDelta:
    """What one choice produced since its previous delta."""

    index: int
    text: str
    num_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None


# ---- preparation ------------------------------------------------------------------------------

def prepare_completion(body: CompletionRequest, tokenizer: Any, max_model_len: int, max_n: int) -> PreparedRequest:
    if body.echo:
        raise bad_request("echo is not supported", "echo")
    if body.suffix:
        raise bad_request("suffix is not supported", "suffix")
    prompts = _completion_prompts(body.prompt, tokenizer)
    params = _sampling_params(body, body.max_tokens, body.logprobs, max_n)
    return _prepared("completion", "cmpl", body, prompts, params, tokenizer, max_model_len)


def prepare_chat(body: ChatCompletionRequest, tokenizer: Any, max_model_len: int, max_n: int) -> PreparedRequest:
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        prompt = apply_chat_template(tokenizer, messages, add_generation_prompt=body.add_generation_prompt)
    except Exception as exc:  # jinja errors of a template that rejects these messages
        raise bad_request(f"cannot apply the chat template: {exc}", "messages") from None
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = _sampling_params(body, max_tokens, logprobs, max_n)
    return _prepared("chat", "chatcmpl", body, [prompt], params, tokenizer, max_model_len)


def _prepared(kind: str, id_prefix: str, body: GenerationFields, prompts: list[list[int]], params: SamplingParams,
              tokenizer: Any, max_model_len: int) -> PreparedRequest:
    vocab_size = len(tokenizer)
    for prompt in prompts:
        check_prompt(prompt, params.max_tokens, max_model_len, vocab_size)
    include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
    return PreparedRequest(kind, f"{id_prefix}-{uuid.uuid4().hex}", body.model, prompts, params, body.stream,
                           include_usage, body.priority)


def _completion_prompts(prompt: str | list, tokenizer: Any) -> list[list[int]]:
    """str | list[str] | list[int] | list[list[int]] -> token ids of each prompt."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise bad_request("prompt must not be empty", "prompt")
    if all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    prompts = []
    for p in prompt:
        ids = list(tokenizer.encode(p)) if isinstance(p, str) else list(p)
        if not ids:
            raise bad_request("prompt must not be empty", "prompt")
        prompts.append(ids)
    return prompts


def check_prompt(prompt: Sequence[int], max_tokens: int | None, max_model_len: int, vocab_size: int) -> None:
    """400 unless the prompt's tokens exist and prompt + max_tokens fit the context."""
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise bad_request(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab_size})", "prompt")
    if len(prompt) >= max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens, but the prompt has {len(prompt)} "
            f"tokens (at least one token must be generated). Shorten the prompt.", "prompt")
    if max_tokens is not None and len(prompt) + max_tokens > max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the prompt, {max_tokens} in the completion). "
            f"Reduce the prompt or max_tokens.", "max_tokens")


def _sampling_params(body: GenerationFields, max_tokens: int | None, logprobs: int | None, max_n: int) -> SamplingParams:
    if body.n > max_n:
        raise bad_request(f"n must be at most {max_n}, got {body.n}", "n")
    given = {"temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k, "min_p": body.min_p}
    try:
        return SamplingParams(
            n=body.n, max_tokens=max_tokens, seed=body.seed, stop=_stop_list(body.stop),
            stop_token_ids=list(body.stop_token_ids or []), presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty,
            min_tokens=body.min_tokens, ignore_eos=body.ignore_eos, logprobs=logprobs,
            skip_special_tokens=body.skip_special_tokens, **{k: v for k, v in given.items() if v is not None})
    except ValueError as exc:
        raise bad_request(str(exc), str(exc).split(" ", 1)[0]) from None


def _stop_list(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not s for s in stops):
        raise bad_request("stop strings must be non-empty", "stop")
    return stops


# ---- running ----------------------------------------------------------------------------------

class ChoiceStream:
    """One choice: a worker request's token chunks turned into final text deltas."""

    def __init__(self, index: int, prep: PreparedRequest, prompt: list[int], tokenizer: Any,
                 dispatcher: Dispatcher, metrics: GatewayMetrics) -> None:
        self.index, self.prep, self.prompt = index, prep, prompt
        self.dispatcher, self.metrics = dispatcher, metrics
        params = prep.params
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt, params.skip_special_tokens, params.stop)
        worker_params = SamplingParams(**{**params.__dict__, "n": 1, "stop": []})
        suffix = f"-{index}" if prep.num_choices > 1 else ""
        self.worker_request = WorkerRequest(f"{prep.request_id}{suffix}", prompt, worker_params, prep.priority)

    async def __aiter__(self) -> AsyncIterator[ChoiceDelta]:
        last_token_s: float | None = None
        held_tokens = 0  # tokens whose text the detokenizer still holds back (partial UTF-8, stop prefix)
        tokens = self.dispatcher.generate(self.worker_request)
        try:
            async for chunk in tokens:
                now = time.monotonic()
                self._observe_latency(now, last_token_s, len(chunk.token_ids))
                last_token_s = now
                delta = self._delta(chunk)
                delta.num_tokens += held_tokens
                if delta.finish_reason is not None:
                    self._observe_final(chunk)
                    yield delta
                    return  # closing `tokens` cancels the worker call when a stop string ended us
                if delta.text or delta.logprobs:
                    held_tokens = 0
                    yield delta
                else:
                    held_tokens = delta.num_tokens
        finally:
            await tokens.aclose()
        raise service_unavailable(f"worker stream for {self.worker_request.request_id} ended without a finish reason")

    def _delta(self, chunk) -> ChoiceDelta:
        text = self.detokenizer.add(chunk.token_ids)
        finish, stop_reason = None, None
        if self.detokenizer.stopped is None and chunk.finish_reason is not None:
            text += self.detokenizer.finish()
        if self.detokenizer.stopped is not None:
            finish, stop_reason = "stop", self.detokenizer.stopped
        elif chunk.finish_reason is not None:
            finish, stop_reason = chunk.finish_reason, chunk.stop_token_id
        logprobs = []
        if self.prep.params.logprobs is not None:
            tops = chunk.top_logprobs or [[] for _ in chunk.token_ids]
            logprobs = [TokenLogprob(t, lp, top) for t, lp, top in zip(chunk.token_ids, chunk.logprobs, tops)]
        return ChoiceDelta(self.index, text, len(chunk.token_ids), logprobs, finish, stop_reason)

    def _observe_latency(self, now: float, last_token_s: float | None, num_tokens: int) -> None:
        if last_token_s is None:
            self.metrics.ttft_s.observe(now - self.prep.arrival_s)
        elif num_tokens:
            gap = (now - last_token_s) / num_tokens
            for _ in range(num_tokens):
                self.metrics.itl_s.observe(gap)
        self.metrics.generation_tokens.inc(num_tokens)

    def _observe_final(self, chunk) -> None:
        self.metrics.prompt_tokens.inc(len(self.prompt))
        self.metrics.cached_tokens.inc(chunk.num_cached_tokens)
        self.metrics.kv_bytes.inc(chunk.kv_bytes_received)
        self.metrics.recomputed_tokens.inc(chunk.num_recomputed_tokens)


def choice_streams(prep: PreparedRequest, tokenizer: Any, dispatcher: Dispatcher,
                   metrics: GatewayMetrics) -> list[ChoiceStream]:
    """Choice index = prompt index * n + i, as OpenAI numbers them."""
    n = prep.params.n
    return [ChoiceStream(p * n + i, prep, prompt, tokenizer, dispatcher, metrics)
            for p, prompt in enumerate(prep.prompts) for i in range(n)]


async def merge_streams(streams: Sequence[ChoiceStream]) -> AsyncIterator[ChoiceDelta]:
    """Deltas of all choices in arrival order; the first failure cancels the rest and is raised."""
    if len(streams) == 1:
        async for delta in streams[0]:
            yield delta
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(stream: ChoiceStream) -> None:
        try:
            async for delta in stream:
                queue.put_nowait(delta)
        except Exception as exc:
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(done)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

