"""Tokenization for the gateway: load a tokenizer, render chat prompts, detokenize a stream.

Imports no torch: the gateway process uses this module and stays torch-free.

`IncrementalDetokenizer` turns the token ids a worker streams back into text deltas that are
final: a delta never ends in a half-decoded UTF-8 character and never contains text that may
turn out to be the start of a stop string.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

# Tokens of context decoded before the first new token, so that decoders which treat the first
# token of a sequence specially (leading-space stripping) see the same neighbourhood as a full
# decode would.
_PREFIX_WINDOW_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class TokenizerLoadError(ValueError):
    """The tokenizer files of a checkpoint directory are missing or unreadable."""


_GENERIC_FAST_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(model_dir: str) -> Any:
    """Load the Hugging Face tokenizer saved in `model_dir` (local files only, no hub).

    A checkpoint whose tokenizer is the generic fast class (tokenizer.json + config naming
    TokenizersBackend/PreTrainedTokenizerFast, as the demo's) is loaded through that class
    directly: AutoTokenizer would read the model config, which makes transformers import torch,
    and the gateway should not pay for torch. Model-specific classes go through AutoTokenizer.
    """
    if not os.path.isdir(model_dir):
        raise TokenizerLoadError(f"tokenizer directory does not exist: {model_dir}")
    try:
        if _tokenizer_class(model_dir) in _GENERIC_FAST_CLASSES:
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(model_dir, local_files_only=True)
        from transformers import AutoTokenizer  # deferred: importing transformers takes seconds

        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise TokenizerLoadError(f"cannot load a tokenizer from {model_dir}: {exc}") from exc


def _tokenizer_class(model_dir: str) -> str | None:
    config_path = os.path.join(model_dir, "tokenizer_config.json")
    if not os.path.isfile(config_path) or not os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
        return None
    with open(config_path) as f:
        return json.load(f).get("tokenizer_class")


def apply_chat_template(
    tokenizer: Any, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
    tools: Sequence[dict[str, Any]] | None = None,
) -> list[int]:
    """Render `messages` (and `tools`) with the tokenizer's chat template; the prompt's token ids.

    The template writes any BOS token itself, so the text is encoded without adding special
    tokens a second time.
    """
    text = render_chat_prompt(tokenizer, messages, add_generation_prompt, tools)
    return list(tokenizer.encode(text, add_special_tokens=False))


def render_chat_prompt(
    tokenizer: Any, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
    tools: Sequence[dict[str, Any]] | None = None, continue_final_message: bool = False,
    template_kwargs: dict[str, Any] | None = None,
) -> str:
    """The chat template's text for `messages` (and `tools`, OpenAI's tool objects); `template_kwargs`
    are extra template variables (vLLM's chat_template_kwargs, e.g. Qwen3's enable_thinking), none
    of them a parameter of apply_chat_template (`reserved_template_kwargs`)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat_template; send a plain completion prompt instead")
    return tokenizer.apply_chat_template(
        list(messages), tools=list(tools) if tools else None, tokenize=False,
        add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
        **(template_kwargs or {}))


def reserved_template_kwargs(tokenizer: Any) -> frozenset[str]:
    """Names a template variable may not take: apply_chat_template's own parameters (the request
    sets messages, tools and the generation prompt through its own fields)."""
    parameters = inspect.signature(tokenizer.apply_chat_template).parameters
    return frozenset(name for name, p in parameters.items() if p.kind is not p.VAR_KEYWORD) | {"messages"}


def backend_decoder(tokenizer: Any):
    """The Rust `tokenizers` decode behind a transformers fast tokenizer, when the wrapper's own decode
    adds nothing to it (its `_decode` is the base class's, and we never ask for clean-up), else
    None. The gateway decodes twice per streamed token, and the wrapper costs about 3x the Rust
    call."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend as base
    except ImportError:  # transformers 4
        from transformers import PreTrainedTokenizerFast as base
    return backend.decode if type(tokenizer)._decode is base._decode else None


class IncrementalDetokenizer:
    """Streaming detokenizer for one request, with stop-string handling.

    Two offsets into the token list make deltas exact: text is decoded over
    `ids[prefix_offset:]`, and only what lies past the decode of `ids[prefix_offset:read_offset]`
    is new. A decode that ends in U+FFFD is an incomplete multi-byte character: the tokens stay
    pending until the character completes (or `finish()` flushes them).

    Finalized text then passes the stop-string filter: a suffix that could begin a stop string is
    held back; when a stop string appears, `stopped` is set to it and the output ends before it
    (or after it, with `include_stop_str_in_output`).
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        stop: Iterable[str] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        self._tokenizer = tokenizer
        self._backend_decode = backend_decoder(tokenizer)
        self._skip_special_tokens = skip_special_tokens
        self._stop = [s for s in stop if s]
        self._include_stop = include_stop_str_in_output
        self._max_stop_len = max((len(s) for s in self._stop), default=0)
        # Only the prompt's tail is kept as decode context.
        self._token_ids = list(prompt_token_ids[-_PREFIX_WINDOW_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._token_ids)
        self._text = ""  # all finalized output text (before stop truncation)
        self._num_emitted_chars = 0
        self.stopped: str | None = None
        """The stop string that ended the output, or None."""

    @property
    def watches_stop_strings(self) -> bool:
        """True when some stop string may end the output: then every token must be added as it comes."""
        return bool(self._stop)

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return self._text[: self._num_emitted_chars]

    def add(self, token_ids: Iterable[int]) -> str:
        """Append newly generated token ids; return the text that became final."""
        if self.stopped is not None:
            return ""
        self._token_ids.extend(token_ids)
        self._text += self._decode_new(final=False)
        return self._emit(final=False)

    def finish(self) -> str:
        """Generation ended for a reason other than a stop string: flush everything held."""
        if self.stopped is not None:
            return ""
        self._text += self._decode_new(final=True)
        return self._emit(final=True)

    def _decode(self, token_ids: list[int]) -> str:
        if self._backend_decode is not None:
            return self._backend_decode(token_ids, skip_special_tokens=self._skip_special_tokens)
        return self._tokenizer.decode(
            token_ids,
            skip_special_tokens=self._skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    def _decode_new(self, final: bool) -> str:
        """Text of the tokens past `read_offset`, or "" while it ends in a partial character."""
        if len(self._token_ids) == self._read_offset:
            return ""
        prefix_text = self._decode(self._token_ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._token_ids[self._prefix_offset :])
        if not final and (len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT_CHAR)):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._token_ids)
        return full_text[len(prefix_text) :]

    def _emit(self, final: bool) -> str:
        """Advance the emitted prefix of `_text` as far as the stop strings allow."""
        start = self._num_emitted_chars
        stop_at = self._find_stop(start)
        if stop_at is not None:
            index, stop = stop_at
            self.stopped = stop
            end = index + len(stop) if self._include_stop else index
            self._text = self._text[:end]
        else:
            end = len(self._text) if final else len(self._text) - self._held_back_len(start)
        self._num_emitted_chars = max(end, start)
        return self._text[start:end]

    def _find_stop(self, start: int) -> tuple[int, str] | None:
        """Earliest stop string in `_text` at or after `start` (held-back text begins there)."""
        best: tuple[int, str] | None = None
        for stop in self._stop:
            index = self._text.find(stop, start)
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        return best

    def _held_back_len(self, start: int) -> int:
        """Length of the longest suffix of `_text[start:]` that is a proper prefix of a stop string."""
        pending = self._text[start:]
        for length in range(min(len(pending), self._max_stop_len - 1), 0, -1):
            suffix = pending[-length:]
            if any(stop.startswith(suffix) for stop in self._stop):
                return length
        return 0
