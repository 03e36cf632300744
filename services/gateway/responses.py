"""OpenAI response bodies: completions and chat, whole or as SSE chunks, with logprobs and usage.

`ResponseBuilder` keeps the per-choice state the formats need (text offsets for completion
logprobs, whether a chat choice has sent its role yet, token counts for usage). A streamed chat
choice opens with a chunk of its own, `{"role": "assistant", "content": ""}`, as vLLM's does.
Where OpenAI is silent, vLLM's shapes: prompt_logprobs, the prompt's token ids on the first
chunk of an echoed stream, the last message's role as the response's without a generation prompt.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from splitserve.services.gateway.chat_output import ChatDelta, ChatOutput, ChatOutputStream, parse_chat_output
from splitserve.services.gateway.completion import ChoiceDelta, TokenLogprob
from splitserve.services.gateway.prepare import PreparedRequest


def sse_event(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return f"data: {data}\n\n".encode()


SSE_DONE = sse_event("[DONE]")


class ResponseBuilder:
    def __init__(self, prep: PreparedRequest, tokenizer: Any) -> None:
        self.prep = prep
        self._token_text = lru_cache(maxsize=4096)(
            lambda token_id: tokenizer.decode([token_id], skip_special_tokens=False))
        num = prep.num_choices
        self._text_parts: list[list[str]] = [[] for _ in range(num)]  # joined once, for a whole response
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(num)]
        self.token_ids: list[list[int]] = [[] for _ in range(num)]
        self.finish: list[tuple[str | None, str | int | None]] = [(None, None)] * num
        self.prompt_logprobs: list[list | None] = [None] * num
        self.num_cached_tokens = 0
        self._text_offsets = [0] * num
        self._role_sent = [False] * num
        self._choice_tokens = [0] * num
        parses = prep.kind == "chat" and prep.output.parses
        self._outputs = [ChatOutputStream(prep.output) for _ in range(num)] if parses and prep.stream else None

    def add(self, delta: ChoiceDelta) -> None:
        """Record a delta (for the final body and for usage)."""
        self._text_parts[delta.index].append(delta.text)
        self.logprobs[delta.index].extend(delta.logprobs)
        if self.prep.return_token_ids:
            self.token_ids[delta.index].extend(delta.token_ids)
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs[delta.index] = delta.prompt_logprobs
        self._choice_tokens[delta.index] += delta.num_tokens
        self.num_cached_tokens += delta.num_cached_tokens
        if delta.finish_reason is not None:
            self.finish[delta.index] = (delta.finish_reason, delta.stop_reason)

    @property
    def num_completion_tokens(self) -> int:
        return sum(self._choice_tokens)

    def _prompt_of(self, index: int) -> list[int]:
        """Choice `index`'s prompt (choice index = prompt index * n + k)."""
        return self.prep.prompts[index // self.prep.params.n]

    def usage(self) -> dict[str, Any]:
        """OpenAI's usage; cached_tokens: prompt tokens whose KV was reused instead of computed.
        prompt_tokens counts each prompt once (as OpenAI does for n > 1); cached_tokens is summed
        over the choices, so with n > 1 it can exceed a single prompt's cached count."""
        prompt_tokens = sum(len(p) for p in self.prep.prompts)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": self.num_completion_tokens,
                "total_tokens": prompt_tokens + self.num_completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.num_cached_tokens}}

    # ---- whole responses ---------------------------------------------------------------

    def final_body(self) -> dict[str, Any]:
        choices = []
        texts = ["".join(parts) for parts in self._text_parts]
        for index in range(self.prep.num_choices):
            finish_reason, stop_reason = self.finish[index]
            logprobs = self._logprobs(index, self.logprobs[index]) if self._wants_logprobs() else None
            if self.prep.kind == "chat":
                output = (parse_chat_output(self.prep.output, texts[index]) if self.prep.output.parses
                          else ChatOutput(None, texts[index], []))
                choices.append({"index": index, "message": chat_message(output, self.prep.response_role),
                                "logprobs": logprobs,
                                "finish_reason": _chat_finish(finish_reason, bool(output.tool_calls)),
                                "stop_reason": stop_reason})
            else:
                choices.append({"index": index, "text": texts[index], "logprobs": logprobs,
                                "finish_reason": finish_reason, "stop_reason": stop_reason,
                                "prompt_logprobs": self._prompt_logprobs(self.prompt_logprobs[index])})
            if self.prep.return_token_ids:
                choices[-1].update(prompt_token_ids=self._prompt_of(index),
                                   token_ids=self.token_ids[index])
        if self.prep.best_of_n is not None:
            choices = self._best_of(choices)
        return {**self._envelope(stream=False), "choices": choices, "usage": self.usage()}

    def _best_of(self, candidates: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Per prompt, the best_of_n candidates of highest cumulative logprob, renumbered."""
        per_prompt, keep = self.prep.params.n, self.prep.best_of_n
        chosen = []
        for start in range(0, len(candidates), per_prompt):
            ranked = sorted(range(start, start + per_prompt),
                            key=lambda i: -sum(e.logprob or 0.0 for e in self.logprobs[i]))
            chosen += [candidates[i] for i in ranked[:keep]]
        return [{**choice, "index": index} for index, choice in enumerate(chosen)]

    # ---- stream chunks -----------------------------------------------------------------

    def chunk(self, delta: ChoiceDelta) -> dict[str, Any] | None:
        """The SSE chunk of `delta`; None when a parser holds all of its text back for now."""
        logprobs = self._logprobs(delta.index, delta.logprobs) if self._wants_logprobs() else None
        finish_reason = delta.finish_reason
        if self.prep.kind == "chat":
            message = self._chat_delta(delta)
            if message is None and logprobs is None and finish_reason is None:
                return None
            if self._outputs is not None:
                finish_reason = _chat_finish(finish_reason, self._outputs[delta.index].has_tool_calls)
            choice = {"index": delta.index, "delta": message or {}, "logprobs": logprobs}
        else:
            choice = {"index": delta.index, "text": delta.text, "logprobs": logprobs}
            names_prompt = self.prep.echo_texts is not None or self.prep.return_token_ids
            if names_prompt and not self._role_sent[delta.index]:
                self._role_sent[delta.index] = True  # vLLM's first chunk of an echo or return_token_ids
                choice["prompt_token_ids"] = self._prompt_of(delta.index)
        choice.update(finish_reason=finish_reason, stop_reason=delta.stop_reason)
        if self.prep.return_token_ids:  # each chunk's new ids (vLLM puts the prompt's on the first one only)
            choice["token_ids"] = delta.token_ids
        return {**self._envelope(stream=True), "choices": [choice], **self._usage_so_far(delta.index)}

    def _usage_so_far(self, index: int, completion_tokens: int | None = None) -> dict[str, Any]:
        """vLLM's continuous usage stats: the choice's prompt and its tokens so far (none asked: {})."""
        if not self.prep.continuous_usage:
            return {}
        prompt = len(self._prompt_of(index))
        done = self._choice_tokens[index] if completion_tokens is None else completion_tokens
        return {"usage": {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}}

    def _chat_delta(self, delta: ChoiceDelta) -> dict[str, Any] | None:
        if self._outputs is None:
            message: dict[str, Any] = {"content": delta.text}
        else:
            parsed = self._outputs[delta.index].feed(delta.text, final=delta.finish_reason is not None)
            message = delta_message(parsed) if parsed else {}
        return message or None

    def sse_chunks(self, delta: ChoiceDelta) -> list[bytes]:
        """The delta's chunk, after the role chunk if this opens a chat choice."""
        events = []
        if self.prep.kind == "chat" and not self._role_sent[delta.index]:
            self._role_sent[delta.index] = True
            role = {"index": delta.index, "delta": {"role": self.prep.response_role, "content": ""},
                    "logprobs": None, "finish_reason": None}
            if self.prep.return_token_ids:  # where the whole body has them: on the choice
                role["prompt_token_ids"] = self._prompt_of(delta.index)
            events.append(sse_event({**self._envelope(stream=True), "choices": [role], **self._usage_so_far(delta.index, 0)}))
        chunk = self.chunk(delta)
        return events + ([sse_event(chunk)] if chunk is not None else [])

    def sse_closing(self) -> list[bytes]:
        return [sse_event(self.usage_chunk())] if self.prep.include_usage else []

    def usage_chunk(self) -> dict[str, Any]:
        return {**self._envelope(stream=True), "choices": [], "usage": self.usage()}

    # ---- helpers -----------------------------------------------------------------------

    def _envelope(self, stream: bool) -> dict[str, Any]:
        if self.prep.kind == "chat":
            obj = "chat.completion.chunk" if stream else "chat.completion"
        else:
            obj = "text_completion"
        return {"id": self.prep.request_id, "object": obj, "created": self.prep.created, "model": self.prep.model}

    def _wants_logprobs(self) -> bool:
        return self.prep.params.logprobs is not None

    def _logprobs(self, index: int, entries: list[TokenLogprob]) -> dict[str, Any]:
        if self.prep.kind == "chat":
            return {"content": [self._chat_logprob(e) for e in entries], "refusal": None}
        return self._completion_logprobs(index, entries)

    def _prompt_logprobs(self, entries: list | None) -> list | None:
        """vLLM's prompt_logprobs: None for the first prompt token, then per token a dict keyed by
        token id (as a string) holding the prompt token itself and the top alternatives."""
        if entries is None:
            return None
        out: list = [None]
        for token_id, logprob, rank, top in entries:
            position = {str(token_id): {"logprob": logprob, "rank": rank, "decoded_token": self._token_text(token_id)}}
            for alt_rank, (alt_id, alt_logprob) in enumerate(top, start=1):
                position.setdefault(str(alt_id), {"logprob": alt_logprob, "rank": alt_rank,
                                                  "decoded_token": self._token_text(alt_id)})
            out.append(position)
        return out

    def _chat_logprob(self, entry: TokenLogprob) -> dict[str, Any]:
        token = self._token_text(entry.token_id)
        return {"token": token, "logprob": entry.logprob, "bytes": list(token.encode("utf-8")),
                "top_logprobs": [{"token": (t := self._token_text(tid)), "logprob": lp, "bytes": list(t.encode("utf-8"))}
                                 for tid, lp in entry.top]}

    def _completion_logprobs(self, index: int, entries: list[TokenLogprob]) -> dict[str, Any]:
        tokens, offsets = [], []
        for e in entries:
            token = self._token_text(e.token_id)
            tokens.append(token)
            offsets.append(self._text_offsets[index])
            self._text_offsets[index] += len(token)
        # Legacy completions list the sampled token among each position's top alternatives (an
        # echoed prompt's first token has none).
        top = [None if e.top is None else {tokens[k]: e.logprob, **{self._token_text(tid): lp for tid, lp in e.top}}
               for k, e in enumerate(entries)]
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries], "top_logprobs": top,
                "text_offset": offsets}


def chat_message(output: ChatOutput, role: str = "assistant") -> dict[str, Any]:
    message: dict[str, Any] = {"role": role, "content": output.content}
    if output.reasoning is not None:
        message["reasoning_content"] = output.reasoning
    if output.tool_calls:
        message["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.name, "arguments": c.arguments}} for c in output.tool_calls]
    return message


def delta_message(parsed: ChatDelta) -> dict[str, Any]:
    """OpenAI's chunk delta: a call's first entry has its index, id, type and name, later ones
    only its index and argument fragments."""
    message: dict[str, Any] = {}
    if parsed.reasoning:
        message["reasoning_content"] = parsed.reasoning
    if parsed.content:
        message["content"] = parsed.content
    calls = []
    for d in parsed.tool_calls:
        if d.id is not None:
            calls.append({"index": d.index, "id": d.id, "type": "function",
                          "function": {"name": d.name, "arguments": ""}})
        else:
            calls.append({"index": d.index, "function": {"arguments": d.arguments}})
    if calls:
        message["tool_calls"] = calls
    return message


def _chat_finish(finish_reason: str | None, has_tool_calls: bool) -> str | None:
    return "tool_calls" if finish_reason == "stop" and has_tool_calls else finish_reason
