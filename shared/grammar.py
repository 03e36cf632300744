"""Constrained decoding: compile a request's spec, track it token by token, mask.

    GrammarCompiler.submit(spec) ─▶ Future[compiled]           (worker thread, cached per spec)
    compiler.request_grammar(compiled, stop tokens, tokens so far) ─▶ RequestGrammar (one a request)
        .fill(bitmask, row)   the tokens allowed next, as one row of a [N, ceil(V/32)] int32 bitmask
        .accept(token)        advance; False if the grammar forbids the token
        .terminated           the grammar is complete (the request ends with finish_reason stop)
        .admits_no_token()    no token may come next, yet the grammar is not complete: no output
                              satisfies it (checked once at compile time, and when a token is rejected)

A step's bitmask, all rows at once and off the step loop's thread, is grammar_fill.py's.

Two grammar engines (`--structured-outputs-backend`, vLLM's names): `xgrammar` (this module,
the default) and `guidance`, llguidance (shared/grammar_guidance.py). A backend compiles a spec
and makes a request's grammar from what it compiled (the same interface as RequestGrammar:
`handle`, `accept`, `note_accepted`, `fill`, `terminated`, `stop_token_ids`);
`grammar_fill.make_filler` picks the filler of its steps' bitmasks. The bitmask format is the
same for both (bit t of a row: token t allowed), so the sampler's mask kernel is one.

The compiler is bound to the engine's tokenizer (loaded from the checkpoint on first use, on a
compile thread) and to the model's vocabulary size, which can exceed the tokenizer's: ids past
the tokenizer are never allowed. Compiling runs on compile threads (shared/grammar_compile.py) so
the step loop never waits; a compile that runs past the timeout fails its spec, counted from when
it started, so a request that waited behind others is not blamed for their compile.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from concurrent.futures import Future

import torch
import xgrammar as xgr

from splitserve.shared.grammar_compile import COMPILE_THREADS, CompilePool, CompileTimeout
from splitserve.shared.request import Request, RequestStatus
from splitserve.shared.structured_outputs import INVALID, StructuredOutputsParams

logger = logging.getLogger(__name__)

CACHE_SIZE = 512
"""Compiled grammars kept (LRU), failures included, so a bad schema is not recompiled."""

_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


class GrammarError(ValueError):
    """The spec does not compile; the message names the problem."""


def bitmask_width(vocab_size: int) -> int:
    return -(-vocab_size // 32)


class GrammarCompiler:
    """Compiles specs for one tokenizer on compile threads; results are cached per spec."""

    def __init__(self, model_dir: str, vocab_size: int, num_threads: int = COMPILE_THREADS,
                 backend: str = "xgrammar", eos_token_ids: Sequence[int] = (), timeout_s: float = 30.0) -> None:
        self.model_dir, self.vocab_size, self.eos_token_ids = model_dir, vocab_size, tuple(eos_token_ids)
        self.backend_name, self.timeout_s = backend, timeout_s
        self._pool = CompilePool(num_threads, timeout_s)
        self._backend = None  # built from the tokenizer on a compile thread, on first use
        self._backend_lock = threading.Lock()
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], Future] = OrderedDict()

    def submit(self, spec: StructuredOutputsParams) -> Future:
        """A future of the compiled grammar: `result()` raises GrammarError if the spec does not
        compile, CompileTimeout if its compile ran past `timeout_s` (cached like any failure)."""
        key = spec.key()
        with self._lock:
            future = self._cache.get(key)
            if future is None:
                future = self._cache[key] = self._pool.submit(self._compile, spec)
                if len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(key)
        return future

    def close(self) -> None:
        self._pool.close()

    def request_grammar(self, compiled, stop_token_ids: Sequence[int], token_ids: Sequence[int] = ()):
        """The grammar of one request from what `submit` compiled (after its future is done)."""
        return self._backend.request_grammar(compiled, stop_token_ids, token_ids)

    def _compile(self, spec: StructuredOutputsParams):
        backend = self._built_backend()
        try:
            compiled = backend.compile(spec)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise GrammarError(f"{INVALID}.{spec.kind}: {_clean(exc)}") from None
        # A grammar no token can begin (`root ::= root`) compiles; caught here, once per spec, it
        # is the request's 400 rather than a rejected first token.
        if backend.request_grammar(compiled, self.eos_token_ids).admits_no_token():
            raise GrammarError(unsatisfiable(spec.kind, 0))
        return compiled

    def _built_backend(self):
        with self._backend_lock:  # the first compiles may start on several threads at once
            if self._backend is None:
                from splitserve.shared.tokenizer import load_tokenizer

                try:
                    tokenizer = load_tokenizer(self.model_dir)
                except Exception as exc:  # a config-only checkpoint (benchmarks) has no tokenizer
                    raise GrammarError(f"structured outputs need the model's tokenizer: {exc}") from None
                self._backend = backend_class(self.backend_name)(tokenizer, self.vocab_size, self.eos_token_ids)
        return self._backend


def backend_class(name: str):
    """The backend class of `--structured-outputs-backend NAME` (llguidance is imported only if named)."""
    if name == "guidance":
        from splitserve.shared.grammar_guidance import GuidanceBackend

        return GuidanceBackend
    return XGrammarBackend


class XGrammarBackend:
    """xgrammar: compiled grammars are xgr.CompiledGrammar, bitmasks fill on grammar_fill's pool."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Sequence[int] = ()) -> None:
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)

    def compile(self, spec: StructuredOutputsParams) -> xgr.CompiledGrammar:
        return _compile_spec(self._compiler, spec)

    @staticmethod
    def request_grammar(compiled: xgr.CompiledGrammar, stop_token_ids: Sequence[int],
                        token_ids: Sequence[int] = ()) -> RequestGrammar:
        return RequestGrammar(compiled, stop_token_ids, token_ids)


def _compile_spec(compiler: xgr.GrammarCompiler, spec: StructuredOutputsParams) -> xgr.CompiledGrammar:
    # Compact JSON (no free whitespace): a small or weak model otherwise pads with whitespace
    # until max_tokens instead of closing the object.
    kind = spec.kind
    if kind in ("json", "json_object"):
        schema = spec.json_text() if kind == "json" else json.dumps({"type": "object"})
        return compiler.compile_grammar(json_schema_grammar(schema))
    if kind == "regex":
        return compiler.compile_regex(spec.regex)
    if kind == "choice":
        return compiler.compile_grammar(choice_grammar(spec.choice))
    if kind == "structural_tag":
        return compiler.compile_structural_tag(spec.structural_tag)
    return compiler.compile_grammar(spec.grammar)


_LENGTH_BOUNDED_CHAR = '[^\\"\\\\\\r\\n]'
"""xgrammar 0.2.9 writes a string with minLength/maxLength as repeats of this class, which lets raw
control characters (U+0000-U+001F) in: JSON forbids them, so they are excluded (as its unbounded
strings do); the rest of the grammar is xgrammar's own."""
_JSON_STRING_CHAR = '[^\\0-\\x1f\\"\\\\]'


def json_schema_grammar(schema: str) -> str:
    """The EBNF of a JSON schema, compact (no free whitespace between tokens)."""
    ebnf = str(xgr.Grammar.from_json_schema(schema, any_whitespace=False))
    return ebnf.replace(_LENGTH_BOUNDED_CHAR, _JSON_STRING_CHAR)


def choice_grammar(choices: Sequence[str]) -> str:
    """EBNF whose language is exactly `choices` (JSON string literals are xgrammar literals)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def unsatisfiable(kind: str, num_tokens: int) -> str:
    """Why a request fails whose grammar admits no token after its first `num_tokens`."""
    where = "no token may begin it" if num_tokens == 0 else f"no token may follow the {num_tokens} generated"
    return f"{INVALID}.{kind}: no output can satisfy it ({where})"


def _clean(exc: BaseException) -> str:
    """xgrammar's C++ messages start with a time stamp and a source location: keep the reason."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return _LOCATION.sub("", lines[0] if lines else type(exc).__name__).strip()


class RequestGrammar:
    """One request's matcher, advanced with every token the request accepts."""

    def __init__(self, compiled: xgr.CompiledGrammar, stop_token_ids: Sequence[int],
                 token_ids: Sequence[int] = ()) -> None:
        # No stop token (ignore_eos): the request ends when the grammar is complete.
        self.matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=list(stop_token_ids) or None,
                                          terminate_without_stop_token=not stop_token_ids)
        self.handle = self.matcher._handle
        """What the batched calls take (grammar_fill.py calls xgrammar below its Python wrapper)."""
        self._compiled = compiled
        self.stop_token_ids = frozenset(stop_token_ids)
        """The tokens that end the grammar once accepted (none: it ends when complete)."""
        self.terminated = self.matcher.is_terminated()
        """The grammar is complete. An attribute, kept by `accept`: the engine reads it while a
        bitmask fill may be working on the matcher (grammar_fill.py)."""
        for token_id in token_ids:  # the decode side and a preempted request rebuild from the tokens
            if not self.accept(token_id):
                raise GrammarError(f"token {token_id} does not match the grammar")

    def accept(self, token_id: int) -> bool:
        accepted = self.matcher.accept_token(token_id)
        self.note_accepted(token_id, accepted)
        return accepted

    def note_accepted(self, token_id: int, accepted: bool) -> None:
        """Keep `terminated` once the matcher took (or refused) a token, here or in a batched accept."""
        if not self.stop_token_ids:  # complete is terminated
            self.terminated = self.matcher.is_terminated()
        elif accepted and token_id in self.stop_token_ids:  # xgrammar: terminated once a stop token is in
            self.terminated = True

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def admits_no_token(self) -> bool:
        """No token may come next and the grammar is not complete: no output satisfies it from
        here. Fills a mask of its own on this thread, so only while no step's fill works on the
        matcher (the rare paths: compiling, a rejected token)."""
        if self.terminated:
            return False
        mask = xgr.allocate_token_bitmask(1, self._compiled.tokenizer_info.vocab_size)
        self.matcher.fill_next_token_bitmask(mask)
        return not bool(mask.any())


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | list[int]) -> None:
    """Set the logits [N, V] of forbidden tokens to -inf in the given rows, in place, on the
    logits' device, one kernel for all rows (xgrammar's: Triton on CUDA, a CPU kernel otherwise).
    A bitmask already on the device (grammar_fill.BitmaskFiller) is not copied again."""
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True),
                                    vocab_size=logits.shape[1], indices=rows)


class GrammarWaitlist:
    """Requests of one engine waiting for their grammar (WAITING_FOR_GRAMMAR), out of the scheduler.

    Whose fault a failure is decides how it ends: a spec that does not compile, or whose compile
    ran past the timeout (counted from when it started: CompilePool), is the request's ('abort':
    a 400); a request whose compile had not even started `timeout_s` after it arrived waited for
    the server ('busy': try again), and its compile stays queued, so a retry may find it done."""

    def __init__(self, compiler: GrammarCompiler) -> None:
        self.compiler, self.timeout_s = compiler, compiler.timeout_s
        self._waiting: dict[str, tuple[Request, Future, RequestStatus]] = {}
        self._compiled: deque[str] = deque()
        """Ids whose future finished, appended by the future's callback (a compile thread)."""
        self._queued: deque[tuple[float, str, Future]] = deque()
        """(deadline, id, future) of the requests whose compile was queued when they came, in the
        order added, which is the order of the deadlines (one timeout for all)."""

    def add(self, req: Request) -> None:
        """Start compiling; the request's status is restored once its grammar is ready."""
        future = self.compiler.submit(req.sampling_params.structured_outputs)
        self._waiting[req.request_id] = (req, future, req.status)
        req.status = RequestStatus.WAITING_FOR_GRAMMAR
        if not (future.running() or future.done()):
            self._queued.append((time.monotonic() + self.timeout_s, req.request_id, future))
        future.add_done_callback(lambda _, request_id=req.request_id: self._compiled.append(request_id))

    def remove(self, request_id: str) -> None:
        self._waiting.pop(request_id, None)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._waiting

    def __len__(self) -> int:
        return len(self._waiting)

    def poll(self) -> tuple[list[Request], list[tuple[Request, str, str]]]:
        """(requests whose matcher is now built, (request, why, 'abort' | 'busy') of those that
        cannot have one). Runs every step: it visits the requests whose compile finished since
        the last poll, and the overdue ones at the front of `_queued`, never every waiting
        request (scanning every waiting future was ~8 % of the step loop's samples in a profile
        of the 1B JSON run on the H200)."""
        ready, failed = [], []
        while self._compiled:
            request_id = self._compiled.popleft()
            entry = self._waiting.get(request_id)
            if entry is None or not entry[1].done():  # removed, or the id reused by a newer request
                continue
            del self._waiting[request_id]
            req, future, status = entry
            try:  # the decode side's outputs already hold the first token: the matcher accepts it
                req.grammar = self.compiler.request_grammar(future.result(), sorted(req.eos_token_ids),
                                                            req.output_token_ids)
            except GrammarError as exc:
                failed.append((req, str(exc), "abort"))
                continue
            except CompileTimeout:
                failed.append((req, self._overran(req), "abort"))
                continue
            req.status = status
            ready.append(req)
        failed.extend(self._unstarted())
        return ready, failed

    def _overran(self, req: Request) -> str:
        kind = req.sampling_params.structured_outputs.kind
        return f"{INVALID}.{kind}: it did not compile within {self.timeout_s:g} s (too large or too complex)"

    def _unstarted(self) -> list[tuple[Request, str, str]]:
        """The requests whose compile, queued behind others, has not started by their deadline."""
        now, late = time.monotonic(), []
        while self._queued and self._queued[0][0] < now:
            _, request_id, future = self._queued.popleft()
            entry = self._waiting.get(request_id)
            if entry is not None and entry[1] is future and not (future.running() or future.done()):
                late.append(self._waiting.pop(request_id)[0])
        if not late:
            return []
        message = (f"the server is busy compiling other requests' grammars: this request's did not start "
                   f"within {self.timeout_s:g} s; try again")
        return [(req, message, "busy") for req in late]
