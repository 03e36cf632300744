"""Constrained decoding with llguidance (`--structured-outputs-backend guidance`).

    GuidanceBackend.compile(spec) ─▶ a fresh LLMatcher of the spec's grammar (validated)
    GuidanceGrammar(a copy of it, stop tokens, tokens so far)           (one LLMatcher a request)
    GuidanceFiller.start(new tokens, grammars) ─▶ StepFill              (grammar_fill's interface)

The same contract as the xgrammar backend (shared/grammar.py, shared/grammar_fill.py), with
llguidance's own parallelism: a step's accepts and its bitmask are two calls into llguidance's
executor, which runs them on its own threads with the GIL released. One Python thread of ours
makes the two calls beside the step loop, so a step's grammar work overlaps the booking as the
xgrammar pool's does; there is no slicing of our own.

Specs map onto llguidance's grammar forms: a JSON schema (compact separators, no free whitespace,
as the xgrammar backend compiles it), a regex, a choice (a Lark alternation of the literals), an
EBNF grammar (xgrammar's GBNF-like dialect, converted to Lark by llguidance's converter), and
the gateway's tool-call structural tag (triggered tags with JSON-schema contents). Other
structural-tag forms are refused by name: they need the xgrammar backend.

The matcher allows the model's EOS tokens once the grammar may end. `terminated` follows the
xgrammar backend's meaning: with stop tokens, a stop token was taken; without (ignore_eos), the
grammar is complete.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Sequence

import llguidance as llg
import llguidance.hf
import torch
from llguidance.gbnf_to_lark import GbnfToLarkError, any_to_lark

from splitserve.shared.grammar import GrammarError, RequestGrammar
from splitserve.shared.grammar_fill import BitmaskFiller, _Slice
from splitserve.shared.structured_outputs import StructuredOutputsParams

_JSON_OPTIONS = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}
"""xgrammar's `any_whitespace=False` layout, so both backends write the same JSON."""


class GuidanceBackend:
    """llguidance for one tokenizer: a compiled grammar is a fresh matcher, copied per request."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Sequence[int] = ()) -> None:
        # EOS ids past the tokenizer (a padded embedding) are never sampled under a grammar
        eos = [t for t in eos_token_ids if t < len(tokenizer)]
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos or None)
        self.special_texts = frozenset(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
        """The texts of special tokens: a tool-call trigger that is one is matched as that token."""

    def compile(self, spec: StructuredOutputsParams):
        """A fresh matcher of the spec's grammar, built here on the compile thread (building one
        parses the grammar: ~1 ms on a 128k vocabulary); each request gets a copy (µs)."""
        grammar = grammar_text(spec, self.special_texts)
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise ValueError(messages[0] if messages else "the grammar does not compile")
        matcher = llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    @staticmethod
    def request_grammar(fresh, stop_token_ids: Sequence[int], token_ids: Sequence[int] = ()) -> GuidanceGrammar:
        return GuidanceGrammar(fresh.deep_copy(), stop_token_ids, token_ids)


def grammar_text(spec: StructuredOutputsParams, special_texts: frozenset[str] = frozenset()) -> str:
    """llguidance's grammar for `spec` (not yet validated)."""
    kind = spec.kind
    if kind in ("json", "json_object"):
        schema = spec.json_text() if kind == "json" else json.dumps({"type": "object"})
        return llg.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
    if kind == "regex":
        return llg.LLMatcher.grammar_from_regex(spec.regex)
    if kind == "choice":
        return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec.choice))
    if kind == "structural_tag":
        return structural_tag_grammar(spec.structural_tag, special_texts)
    try:
        return llg.LLMatcher.grammar_from_lark(any_to_lark(spec.grammar))
    except GbnfToLarkError as exc:
        raise ValueError(str(exc)) from None


def structural_tag_grammar(text: str, special_texts: frozenset[str]) -> str:
    """The gateway's tool-call tag (free text; from a trigger on, each tag's content held to its
    schema) as llguidance structural tags; any other form is refused by name."""
    form = json.loads(text).get("format", {})
    tags = form.get("tags") or []
    supported = (form.get("type") == "triggered_tags" and not form.get("stop_after_first")
                 and not form.get("at_least_one") and tags
                 and all(t.get("content", {}).get("type") == "json_schema" for t in tags))
    if not supported:
        raise ValueError("this structural tag form needs --structured-outputs-backend xgrammar "
                         "(guidance takes triggered tags with json_schema contents)")
    triggers = form.get("triggers") or []
    return llg.StructTag.to_grammar([_struct_tag(t, triggers) for t in tags],
                                    assume_special=all(t in special_texts for t in triggers))


def _struct_tag(tag: dict, triggers: list[str]):
    trigger = next((t for t in triggers if tag["begin"].startswith(t)), None)
    if trigger is None:
        raise ValueError(f"structural tag begin {tag['begin']!r} starts with none of its triggers")
    return llg.StructTag(trigger=trigger, begin=tag["begin"], grammar=tag["content"]["json_schema"], end=tag["end"])


class GuidanceGrammar:
    """One request's LLMatcher (RequestGrammar's interface), advanced with every token it accepts."""

    def __init__(self, matcher, stop_token_ids: Sequence[int], token_ids: Sequence[int] = ()) -> None:
        self.matcher = self.handle = matcher
        """A matcher of its own (a copy of the compiled fresh one)."""
        self.stop_token_ids = frozenset(stop_token_ids)
        self.terminated = False
        if token_ids and not self.matcher.consume_tokens(list(token_ids)):
            raise GrammarError(f"tokens {list(token_ids)[:8]} do not match the grammar")
        self.note_accepted(token_ids[-1] if token_ids else -1, True)  # -1: no token, none a stop token

    def accept(self, token_id: int) -> bool:
        accepted = self.matcher.consume_token(token_id)
        self.note_accepted(token_id, accepted)
        return accepted

    def note_accepted(self, token_id: int, accepted: bool) -> None:
        """Keep `terminated` once the matcher took (or refused) a token, here or in a batched accept.
        With stop tokens the matcher is not read: a step's fill may be working on it (a matcher
        is borrowed by one call at a time), and a taken stop token is what ends the grammar."""
        if not self.stop_token_ids:  # ignore_eos: complete is terminated (read after the fill)
            self.terminated = self.matcher.is_accepting() or self.matcher.is_stopped()
        elif accepted and token_id in self.stop_token_ids:
            self.terminated = True

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        row_mask = bitmask[row]
        self.matcher.unsafe_compute_mask_ptr(row_mask.data_ptr(), row_mask.numel() * row_mask.element_size())

    def admits_no_token(self) -> bool:
        """RequestGrammar's: llguidance's matcher at a dead end (`root ::= root`) goes into error
        and allows EOS alone, which would end the output unfinished. Only while no fill works on
        the matcher."""
        if self.terminated:
            return False
        self.matcher.compute_bitmask()
        return self.matcher.is_error()


class GuidanceFiller(BitmaskFiller):
    """BitmaskFiller over llguidance's executor: a step is one slice, accepted and filled by
    the executor's threads (`num_threads` of them) from one thread of ours."""

    def __init__(self, vocab_size: int, device: torch.device, num_threads: int | None = None) -> None:
        super().__init__(vocab_size, device, num_threads)
        self.num_slices = 1
        self._executor = llg.LLExecutor(self.num_threads)

    def accept(self, new_tokens: Sequence[tuple[RequestGrammar, int]]) -> list[bool]:
        if not new_tokens:
            return []
        accepted = self._executor.consume_token_par([(g.handle, t) for g, t in new_tokens])
        for (grammar, token_id), ok in zip(new_tokens, accepted):
            grammar.note_accepted(token_id, ok)
        return list(accepted)

    def fill_inline(self, grammars: Sequence[RequestGrammar | None], rows: list[int]) -> None:
        _fill_rows(self._executor, [grammars[i].handle for i in rows], rows, self.host_bitmask(len(grammars)))

    def _running_pool(self) -> list[_ExecutorThread]:
        if not self._pool:
            self._pool = [_ExecutorThread(self._executor)]
        return self._pool


def _fill_rows(executor, handles: list, rows: list[int], bitmask: torch.Tensor) -> None:
    executor.unsafe_compute_mask_ptr(list(zip(handles, rows)), bitmask.data_ptr(),
                                     bitmask.shape[1] * bitmask.element_size(), bitmask.shape[0])


class _ExecutorThread:
    """Our one thread: takes a step's slice, has the executor accept its tokens, then fill its rows."""

    def __init__(self, executor) -> None:
        self.jobs: queue.SimpleQueue[_Slice | None] = queue.SimpleQueue()
        self._executor = executor
        self._thread = threading.Thread(target=self._serve, name="grammar-guidance", daemon=True)
        self._thread.start()

    def join(self) -> None:
        self._thread.join(60.0)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _serve(self) -> None:
        while (part := self.jobs.get()) is not None:
            part.taken.set()
            try:
                if part.tokens:
                    part.accepted = self._executor.consume_token_par(list(zip(part.accept_handles, part.tokens)))
            except BaseException as exc:  # noqa: BLE001 - raised again on the step loop's thread
                part.error = exc
            part.accept_done.set()  # the step loop books while the rows fill
            try:
                if part.error is None and part.fill_rows:
                    _fill_rows(self._executor, part.fill_handles, part.fill_rows, part.bitmask)
            except BaseException as exc:  # noqa: BLE001
                part.error = exc
            part.done.set()

