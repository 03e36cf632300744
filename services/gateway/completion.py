"""Running a prepared request (prepare.py): its choices streamed as text.

    choice_streams                      one worker request per (prompt, choice): n > 1 and prompt
                                        lists become parallel requests, merged as they produce;
                                        choice k of a prompt has seed + k, as in the offline API
    ChoiceStream                        token chunks -> incremental text; stop strings end the
                                        choice (the worker call is cancelled, the stop string is
                                        never emitted)

Everything here is torch-free; workers see only token ids.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from splitserve.services.gateway.dispatch import Dispatcher
from splitserve.services.gateway.metrics import GatewayMetrics, observe_n
from splitserve.services.gateway.openai_protocol import service_unavailable
from splitserve.services.gateway.prepare import PreparedRequest
from splitserve.services.gateway.worker_client import WorkerRequest
from splitserve.shared.tokenizer import IncrementalDetokenizer


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float | None
    """None for an echoed prompt's first token (nothing precedes it)."""
    top: list[tuple[int, float]] | None


@dataclass
class ChoiceDelta:
    """What one choice produced since its previous delta."""

    index: int
    text: str
    num_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_cached_tokens: int = 0
    """On the final delta: prompt tokens served from a cache (usage.prompt_tokens_details)."""
    token_ids: list[int] = field(default_factory=list)
    prompt_logprobs: list | None = None
    """On a choice's first delta when prompt logprobs were asked for: (token id, logprob, rank,
    top alternatives) of prompt tokens 1.. (see TokenChunk)."""


# ---- running ----------------------------------------------------------------------------------

class ChoiceStream:
    """One choice: a worker request's token chunks turned into final text deltas."""

    def __init__(self, index: int, prep: PreparedRequest, prompt: list[int], tokenizer: Any,
                 dispatcher: Dispatcher, metrics: GatewayMetrics) -> None:
        self.index, self.prep, self.prompt = index, prep, prompt
        self.dispatcher, self.metrics = dispatcher, metrics
        params = prep.params
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt, params.skip_special_tokens, params.stop,
                                                  params.include_stop_str_in_output)
        # Text kept with its special tokens (tool-call markers) still does not show the special
        # token that ended the output (EOS), as in vLLM.
        self._hidden_stop_ids = frozenset() if params.skip_special_tokens else frozenset(tokenizer.all_special_ids)
        # best_of ranks candidates by their logprobs: ask for them even if the client did not.
        logprobs = 0 if prep.best_of_n is not None and params.logprobs is None else params.logprobs
        self.collect_logprobs = logprobs is not None
        # Choice index = prompt index * n + k; choice k gets seed + k (distinct, reproducible).
        worker_params = replace(params.for_choice(index % params.n), stop=[], logprobs=logprobs)
        suffix = f"-{index}" if prep.num_choices > 1 else ""
        self.worker_request = WorkerRequest(f"{prep.worker_request_id}{suffix}", prompt, worker_params, prep.priority,
                                            prep.session)
        self.echo_text = prep.echo_texts[index // params.n] if prep.echo_texts is not None else None

    async def __aiter__(self) -> AsyncIterator[ChoiceDelta]:
        last_token_s: float | None = None
        held_ids: list[int] = []  # tokens whose text the detokenizer still holds back (partial UTF-8, stop prefix)
        tokens = self.dispatcher.generate(self.worker_request)
        try:
            async for chunk in tokens:
                now = time.monotonic()
                self._observe_latency(now, last_token_s, len(chunk.token_ids))
                last_token_s = now
                delta = self._delta(chunk)
                if self.echo_text is not None:
                    self._echo(delta)
                delta.num_tokens += len(held_ids)
                delta.token_ids = held_ids + delta.token_ids
                if delta.finish_reason is not None:
                    self._observe_final(chunk)
                    yield delta
                    return  # closing `tokens` cancels the worker call when a stop string ended us
                if delta.text or delta.logprobs or delta.prompt_logprobs:
                    held_ids = []
                    yield delta
                else:
                    held_ids = delta.token_ids
        finally:
            await tokens.aclose()
        raise service_unavailable(f"worker stream for {self.worker_request.request_id} ended without a finish reason")

    def _echo(self, delta: ChoiceDelta) -> None:
        """Put the prompt (and with logprobs, its tokens' logprobs) before the choice's first text."""
        if self.prep.echo_only:  # the one token the worker made is not the client's: max_tokens 0
            delta.text, delta.logprobs, delta.num_tokens, delta.token_ids = "", [], 0, []
        if self.prep.params.logprobs is not None:
            prompt = [TokenLogprob(self.prompt[0], None, None)]
            prompt += [TokenLogprob(t, lp, top) for t, lp, _, top in delta.prompt_logprobs or []]
            delta.logprobs = prompt + delta.logprobs
        delta.text = self.echo_text + delta.text
        self.echo_text = None

    def _delta(self, chunk) -> ChoiceDelta:
        token_ids = chunk.token_ids
        if chunk.finish_reason == "stop" and token_ids and token_ids[-1] in self._hidden_stop_ids:
            token_ids = token_ids[:-1]
        text, used = self._detokenize(token_ids)
        finish, stop_reason = None, None
        if self.detokenizer.stopped is None and chunk.finish_reason is not None:
            text += self.detokenizer.finish()
        if self.detokenizer.stopped is not None:
            finish, stop_reason = "stop", self.detokenizer.stopped
        elif chunk.finish_reason is not None:
            finish, stop_reason = chunk.finish_reason, chunk.stop_token_id
        kept = list(chunk.token_ids) if self.detokenizer.stopped is None else list(chunk.token_ids[:used])
        logprobs = []
        if self.collect_logprobs:
            tops = chunk.top_logprobs or [[] for _ in chunk.token_ids]
            logprobs = [TokenLogprob(t, lp, top) for t, lp, top in zip(kept, chunk.logprobs, tops)]
        return ChoiceDelta(self.index, text, len(kept), logprobs, finish, stop_reason,
                           chunk.num_cache_hit_tokens if finish is not None else 0, kept,
                           prompt_logprobs=chunk.prompt_logprobs or None)

    def _detokenize(self, token_ids) -> tuple[str, int]:
        """The text that became final, and how many of `token_ids` it took. With stop strings a
        merged chunk is added a token at a time: the token that completes a stop string is the
        last one counted, as vLLM counts, however the worker merged the tokens after it."""
        if not self.detokenizer.watches_stop_strings or len(token_ids) <= 1:
            return self.detokenizer.add(token_ids), len(token_ids)
        parts = []
        for used, token_id in enumerate(token_ids, 1):
            parts.append(self.detokenizer.add([token_id]))
            if self.detokenizer.stopped is not None:
                return "".join(parts), used
        return "".join(parts), len(token_ids)

    def _observe_latency(self, now: float, last_token_s: float | None, num_tokens: int) -> None:
        if last_token_s is None:
            self.metrics.ttft_s.observe(now - self.prep.arrival_s)
        elif num_tokens:
            observe_n(self.metrics.itl_s, (now - last_token_s) / num_tokens, num_tokens)
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

