"""The engine: one synchronous step loop, used by every service and by the offline `LLM` API.

    step():  connector events ─▶ schedule ─▶ start KV loads ─▶ run + sample ─▶ update ─▶ save
             new blocks ─▶ outputs

External KV (KV that lives outside this engine's device pool: another engine's, the host tier)
goes through one `KVConnector` (shared/kv/connector.py), called at fixed points: lookup inside
scheduling, start_load after it, save_blocks for newly computed blocks, hold for a finished
prefill, retain for a keyed session's blocks, poll at the top of each step, abort.

A request's life in one engine (see request.py for the statuses):

    add_request ─▶ WAITING ─▶ RUNNING ─▶ finished ─▶ blocks freed
                                            └─(hold KV)─▶ held until the decode side has them
    add_request(kv handle) ─▶ WAITING_FOR_KV ─▶ (KV landed) RUNNING ─▶ ...
                                            └─(failed) WAITING: recomputed here
    WAITING, host tier hit ─▶ WAITING_FOR_KV ─▶ (restored) RUNNING; (failed) WAITING: recomputed
    add_request(structured outputs) ─▶ WAITING_FOR_GRAMMAR ─(compiled)─▶ WAITING / WAITING_FOR_KV ─▶ ...
                                            └─(does not compile, timeout) finished, `error` set

Single-threaded: only the thread calling `step()` touches the block pool. Token ids in,
token ids out; text lives in the layers above (`llm.py`, the gateway).

A step that raises a Python exception (a request the code cannot handle, not a device fault)
fails the requests that were in it: each is aborted, its blocks freed, and its output carries
`error`; the block pool is checked and the engine goes on. A device fault (a CUDA error, out of
memory) or MAX_FAILED_STEPS failing steps in a row re-raise: the engine is then unusable and the
worker exits to be restarted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec
import torch

from splitserve.shared.config import ConfigError, EngineConfig
from splitserve.shared.cuda_graphs import DecodeGraphs
from splitserve.shared.kv import KVCacheManager
from splitserve.shared.kv.connector import CompositeConnector
from splitserve.shared.kv.layer_groups import GroupedKVCacheManager
from splitserve.shared.kv.sliding_window import SlidingWindowKVCacheManager
from splitserve.shared.request import Request, RequestStatus, SessionHint
from splitserve.shared.runner import PLACEHOLDER, ModelRunner, ModelRunnerOutput, PendingStep, SampledToken
from splitserve.shared.sampler import SamplerOutput
from splitserve.shared.sampling_params import SamplingParams
from splitserve.shared.scheduler import Scheduler, SchedulerOutput
from splitserve.shared.transfer.handle import KvHandle
from splitserve.shared.engine_parts import EngineParts, build_engine_parts
from splitserve.shared.heap import freeze_startup_heap
from splitserve.shared.grammar import GrammarCompiler, GrammarWaitlist
from splitserve.shared.grammar_fill import BitmaskFiller, StepFill, accept_tokens
from splitserve.shared.step_trace import StepTrace
from splitserve.shared.parallel.driver import check_parallel_support
from splitserve.shared.parallel.state import ParallelError

logger = logging.getLogger(__name__)


MAX_FAILED_STEPS = 3
"""Consecutive failing steps after which the engine itself is taken to be broken."""


class RequestError(ValueError):
    """A request cannot be served as given (too long, bad tokens, duplicate id); the message says why."""


@dataclass(frozen=True)
class KvTransferParams:
    hold: bool = False
    """Prefill side: stop after the first token and hold the prompt's KV for a decode instance
    (unless that token already finished the request); the output carries the `KvHandle`."""
    handle: object | None = None
    """Decode side: a `KvHandle` to load the prompt's KV from instead of computing it."""


class EngineOutput(msgspec.Struct, array_like=True, gc=False):
    """What one step produced for one request (deltas, not totals). A msgspec struct: a step's
    outputs cross from the engine process to the serving process as one msgpack message, and
    building one is cheaper than a dataclass (this runs for every request every step)."""

    request_id: str
    new_token_ids: list[int] = []
    new_logprobs: list[float] = []
    new_top_logprobs: list[Sequence[tuple[int, float]]] = []
    new_ranks: list[int] = []
    new_prompt_logprobs: list[SampledToken] = []
    """Prompt tokens 1.. (requests that asked for prompt logprobs), with the first output token."""
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_recomputed_tokens: int = 0
    kv_bytes_received: int = 0
    kv_handle: KvHandle | None = None
    kv_load_window_ns: tuple[int, int, bool] | None = None
    """(start, end, ok) wall-clock ns of this request's remote KV load, for the transfer span."""
    error: str | None = None
    """Set when the request failed after it was added: a step failed on it (finish_reason 'error'),
    or its structured-output grammar does not compile or did not in time (finish_reason 'abort')."""


@dataclass
class InflightStep:
    """Async scheduling: a launched step whose tokens are still on the device."""

    pending: PendingStep
    launched: list[tuple[Request, int, int, int | None, int | None]]
    """(request, its new tokens in this step, its computed tokens after it, index of its placeholder
    output and its row in `pending`, or None twice when it samples nothing)."""
    structured: bool = False
    """Some row samples under a grammar (its matcher takes the token when the step settles)."""


def _is_device_fault(exc: BaseException) -> bool:
    """A fault of the device or its memory rather than of one request (a tensor-parallel rank that
    died or timed out counts): the engine cannot go on."""
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError, ParallelError)):
        return True
    accelerator_error = getattr(torch, "AcceleratorError", None)
    return (accelerator_error is not None and isinstance(exc, accelerator_error)) or "CUDA" in str(exc)
def _collect_prompt_logprobs(req: Request, scored: tuple[int, list[SampledToken]] | None) -> None:
    """Keep the prompt logprobs a step computed; positions seen before (a preempted request
    computes its prompt again) are not added twice."""
    if scored is None:
        return
    first_target, entries = scored
    if req.prompt_logprobs is None:
        req.prompt_logprobs = []
    req.prompt_logprobs.extend(entries[len(req.prompt_logprobs) + 1 - first_target:])


def _penalised(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0


class EngineStats(msgspec.Struct, array_like=True):
    num_running: int
    num_waiting: int
    num_loading_kv: int
    num_held_kv: int
    num_waiting_tokens: int
    num_free_blocks: int
    num_total_blocks: int
    kv_usage: float
    prefix_hit_rate: float
    num_preemptions: int
    kv_group_blocks: dict[str, int] = {}
    """Blocks of each KV layer group's pool ("full", "window_<w>") when the pool is split by group."""


class EngineCore:
    def __init__(self, config: EngineConfig, connector_factory=None) -> None:
        config.validate()
        check_parallel_support(config)
        self.config = config
        # A connector (KV transfer) or a host tier move whole one-pool blocks: no layer-group split then.
        parts: EngineParts = build_engine_parts(
            config, split_kv_by_layer_group=connector_factory is None and not config.cache.kv_offload_gib)
        self.followers = parts.followers
        try:
            self._setup(config, parts, connector_factory)
        except BaseException:
            self.followers.close()
            raise

    def _setup(self, config: EngineConfig, parts: EngineParts, connector_factory) -> None:
        self.model_info = parts.info
        self.model_dir = parts.model_dir
        self.max_model_len = parts.max_model_len
        self.block_size = config.cache.block_size
        window = getattr(parts.model, "uniform_sliding_window", None)
        tier = _host_tier(config, parts, window)
        if parts.kv_groups:  # interleaved windows: one pool and table per layer group
            self.kv = self._window_kv = GroupedKVCacheManager(
                [w for w, _ in parts.kv_groups], parts.group_num_blocks, self.block_size,
                config.cache.enable_prefix_caching)
        elif window:  # every layer slides: blocks behind the window go back to the pool
            self.kv = self._window_kv = SlidingWindowKVCacheManager(
                parts.num_blocks, self.block_size, window, config.cache.enable_prefix_caching)
        else:
            self.kv = KVCacheManager(parts.num_blocks, self.block_size, config.cache.enable_prefix_caching,
                                     track_newly_cached=tier is not None)
            self._window_kv = None
        self._kv_group_blocks = {("full" if w is None else f"window_{w}"): n
                                 for (w, _), n in zip(parts.kv_groups, parts.group_num_blocks)}
        transfer = connector_factory(parts) if connector_factory else None
        self.connector = CompositeConnector(tier, transfer) if tier or transfer else None
        self.has_transfer = transfer is not None
        self.scheduler = Scheduler(config.scheduler, self.kv, tier.lookup if tier else None)
        graphs = None
        if parts.device.type == "cuda" and not config.model.enforce_eager:
            graphs = DecodeGraphs(parts.model, config.scheduler.max_num_seqs, self.max_model_len, self.block_size,
                                  parts.device, num_kv_groups=len(parts.kv_caches))
        warmup_tokens = config.scheduler.max_num_batched_tokens if parts.device.type == "cuda" else 0
        self.runner = ModelRunner(parts.model, parts.kv_caches, self.block_size, parts.device, graphs, warmup_tokens,
                                  parts.followers)
        self.requests: dict[str, Request] = {}
        self._penalised: set[str] = set()
        """Live requests whose sampling reads their previous tokens (see _needs_exact_history)."""
        self.held: dict[str, Request] = {}
        """Prefill side: finished requests whose blocks wait for the decode side to copy them."""
        self.aborting: dict[str, Request] = {}
        """Decode side: aborted requests whose blocks wait for their cancelled transfer to end."""
        self.async_scheduling = config.scheduler.async_scheduling
        if self.async_scheduling is None:  # off with followers: they need every step's real input tokens
            self.async_scheduling = parts.device.type == "cuda" and parts.followers.world_size == 1
        self._inflight: InflightStep | None = None
        self._kv_bytes: dict[str, int] = {}
        self._kv_windows: dict[str, tuple[int, int, bool]] = {}
        self._step_request_ids: list[str] | None = None  # the running step's requests, once scheduled
        self._step_tokens = 0
        self._failed_steps = 0
        if parts.device.type == "cuda":  # on CPU tests build many engines in one process: no freezing
            freeze_startup_heap()
        self.grammars = GrammarWaitlist(GrammarCompiler(parts.model_dir, parts.info.vocab_size),
                                        config.scheduler.grammar_compile_timeout_s)
        self._bitmasks = BitmaskFiller(parts.info.vocab_size, parts.device, config.scheduler.structured_outputs_threads)
        self._trace = StepTrace(config.scheduler.step_trace) if config.scheduler.step_trace else None

    # ---- requests ---------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                    priority: int = 0, kv_transfer: KvTransferParams | None = None,
                    first_token: SampledToken | None = None, session: SessionHint | None = None) -> None:
        self._validate(request_id, prompt_token_ids)
        room = self.max_model_len - len(prompt_token_ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        eos = frozenset(self.model_info.eos_token_ids)  # banned below min_tokens even with ignore_eos, as in vLLM
        req = Request(request_id, list(prompt_token_ids), params, max_tokens, eos, priority, kv_transfer=kv_transfer,
                      session=session)
        if params.seed is not None:
            self.runner.add_generator(request_id, params.seed)
        if kv_transfer is not None and kv_transfer.handle is not None:
            if not self.has_transfer:
                raise RequestError("this engine has no KV connector, so it cannot load remote KV")
            if first_token is None:
                raise RequestError("a request with remote KV must carry the first token sampled by prefill")
            req.status = RequestStatus.WAITING_FOR_KV
            req.append_output(first_token.token_id)
        elif kv_transfer is not None and kv_transfer.hold and not self.has_transfer:
            raise RequestError("this engine has no KV connector, so it cannot hold KV for transfer")
        self.requests[request_id] = req
        if _penalised(params):
            self._penalised.add(request_id)
        if params.structured_outputs is None:
            self.scheduler.add(req)
            return
        self.grammars.add(req)  # compiled on the compiler's thread; scheduled once it is ready

    def _validate(self, request_id: str, prompt_token_ids: list[int]) -> None:
        if request_id in self.requests or request_id in self.held:
            raise RequestError(f"request id {request_id!r} is already in use")
        if not prompt_token_ids:
            raise RequestError("the prompt is empty")
        vocab = self.model_info.vocab_size
        bad = [t for t in prompt_token_ids if not (isinstance(t, int) and 0 <= t < vocab)]
        if bad:
            raise RequestError(f"prompt token id {bad[0]!r} is outside the vocabulary [0, {vocab})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise RequestError(
                f"the prompt has {len(prompt_token_ids)} tokens, but this model's maximum context length is "
                f"{self.max_model_len} tokens (prompt plus at least one generated token)")

    def abort_request(self, request_id: str) -> bool:
        """Stop a request wherever it is and free (or release) its blocks. False if unknown."""
        if request_id in self.held:
            self.connector.abort(request_id)  # blocks are freed when the connector reports them released
            return True
        req = self.requests.get(request_id)
        if req is None:
            return False
        self.scheduler.remove(request_id)
        self.grammars.remove(request_id)
        if req.status is RequestStatus.WAITING_FOR_KV and self.kv.block_ids(request_id):
            # A transfer may still be writing into the blocks: free them only once the connector
            # reports the load ended (load_failed "aborted", or loaded).
            self.connector.abort(request_id)
            self._forget(req)
            self.aborting[request_id] = req
            req.status = RequestStatus.FINISHED_ABORTED
            return True
        self._finish(req, RequestStatus.FINISHED_ABORTED)
        self._kv_bytes.pop(request_id, None)
        self._kv_windows.pop(request_id, None)
        return True

    def has_unfinished_requests(self) -> bool:
        return (bool(self.requests) or bool(self.held) or bool(self.aborting) or self._inflight is not None
                or self.kv.num_pinned_blocks > 0)

    # ---- the step ---------------------------------------------------------------------

    def step(self) -> list[EngineOutput]:
        self._step_request_ids = None
        if self._trace is not None:
            self._trace.begin()
        try:
            outputs = self._step()
        except Exception as exc:  # noqa: BLE001 - classified: a device fault re-raises
            return self._fail_step(exc)
        self._failed_steps = 0
        if self._trace is not None:
            self._trace.end(len(self._step_request_ids or ()), self._step_tokens, len(outputs))
        return outputs

    def _fail_step(self, exc: Exception) -> list[EngineOutput]:
        """Abort the requests of a step that raised (see the module docstring), or re-raise."""
        self._failed_steps += 1
        if _is_device_fault(exc) or self._failed_steps >= MAX_FAILED_STEPS:
            raise exc
        inflight = [entry[0].request_id for entry in self._inflight.launched] if self._inflight else []
        self._inflight = None
        self._bitmasks.wait()  # no fill may still work on a matcher once the step is over
        culprits = dict.fromkeys([*(self._step_request_ids or self.requests), *inflight])
        logger.exception("a step failed; aborting its %d requests", len(culprits))
        message = f"the engine failed on this request: {type(exc).__name__}: {exc}"
        outputs = [EngineOutput(rid, finished=True, finish_reason="error", error=message)
                   for rid in culprits if self.abort_request(rid)]
        self.kv.check_integrity()  # a pool left inconsistent is a broken engine: this raises
        return outputs

    def _step(self) -> list[EngineOutput]:
        outputs: dict[str, EngineOutput] = {}
        self._handle_connector_events(outputs)
        if self.grammars:
            self._admit_compiled(outputs)
        if self._inflight is not None and self._needs_exact_history():
            self._resolve(outputs)  # penalties read the real previous tokens: no overlap this step
        self.kv.sessions.expire(time.monotonic())
        sched = self.scheduler.schedule()
        request_ids = self._step_request_ids = [s.request.request_id for s in sched.scheduled]
        if self._trace is not None:
            self._step_tokens = sched.num_batched_tokens
        for req, source, block_ids in sched.kv_loads:
            if source is getattr(req.kv_transfer, "handle", None):
                self._kv_windows[req.request_id] = (time.time_ns(), 0, False)
            self.connector.start_load(req.request_id, source, block_ids)
        tables = self.kv.block_table_arrays(request_ids)
        if not self.async_scheduling:
            result = self.runner.execute(sched, tables, self._grammar_bitmask(sched))
            self._update(sched, result, outputs)
            self._save_new_blocks()
            return list(outputs.values())
        # Async: launch this step first, then settle the previous one while the device works.
        # A step with grammar rows launches its forward only: its bitmask needs the previous
        # step's tokens, so it is sampled (and booked) once those are settled, while the device
        # still runs the forward. The bitmask fills on the grammar thread while the previous
        # step's tokens are booked (see _resolve).
        previous = self._inflight
        structured = any([s.samples and s.request.grammar is not None for s in sched.scheduled])
        pending = self.runner.execute_async(sched, tables, previous.pending if previous else None,
                                            defer_sampling=structured)
        if not structured:
            launched = self._advance(sched)
        fill = None
        if previous is not None:
            fill = self._resolve(outputs, sched if structured else None)
            self._save_new_blocks()
        if structured:
            self.runner.sample(pending, fill.result() if fill is not None else self._grammar_bitmask(sched))
            launched = self._advance(sched)
        self._inflight = InflightStep(pending, launched, structured) if launched else None
        return list(outputs.values())

    # ---- structured outputs -----------------------------------------------------------

    def _admit_compiled(self, outputs: dict[str, EngineOutput]) -> None:
        """Requests whose grammar is ready join the scheduler; those that cannot have one fail."""
        ready, failed = self.grammars.poll()
        for req, message in failed:
            self._reject(req, message, outputs)
        for req in ready:
            self.scheduler.add(req)

    def _reject(self, req: Request, message: str, outputs: dict[str, EngineOutput], reason: str = "abort") -> None:
        """End a request that cannot go on; 'abort': as given (a 400), 'error': an engine fault."""
        self._finish(req, RequestStatus.FINISHED_ABORTED)
        outputs[req.request_id] = EngineOutput(req.request_id, finished=True, finish_reason=reason, error=message)

    def _grammar_bitmask(self, sched: SchedulerOutput):
        """The bitmask of this step's sampling rows, in the runner's row order (None: no grammar)."""
        return self._bitmasks.build([s.request.grammar for s in sched.scheduled if s.samples])

    @staticmethod
    def _advance_grammars(new_tokens: list[tuple[Request, int]]) -> set[str]:
        """Synchronous steps: advance each grammar's matcher by its request's new token, before any
        output is built; the requests whose grammar rejects it. (Async steps: BitmaskFiller.start.)"""
        accepted = accept_tokens([(req.grammar, token_id) for req, token_id in new_tokens])
        return {req.request_id for (req, _), ok in zip(new_tokens, accepted) if not ok}

    def _advance(self, sched: SchedulerOutput) -> list[tuple[Request, int, int, int | None, int | None]]:
        """Book a launched step before its tokens are known: computed counts move on and each
        sampling request gets a PLACEHOLDER output, so the next step can be scheduled now."""
        launched, num_rows = [], 0
        for s in sched.scheduled:
            req, row = s.request, None
            if s.samples:  # the runner's sampling rows are the scheduled requests that sample, in order
                row, num_rows = num_rows, num_rows + 1
            if self.requests.get(req.request_id) is not req:
                continue  # a deferred step is booked after the previous one ended this request
            req.num_computed_tokens += s.num_new_tokens
            index = None
            if row is not None:
                index = req.num_tokens - req.num_prompt_tokens
                req.append_output(PLACEHOLDER)
                hold = req.kv_transfer is not None and req.kv_transfer.hold
                if hold or index + 1 >= req.max_tokens or req.num_tokens >= self.max_model_len:
                    self.scheduler.remove(req.request_id)  # its next token cannot be needed
            launched.append((req, s.num_new_tokens, req.num_computed_tokens, index, row))
        return launched

    def _resolve(self, outputs: dict[str, EngineOutput], next_sched: SchedulerOutput | None = None) -> StepFill | None:
        """Settle the in-flight step: fill its placeholders, cache its blocks, apply stop rules.
        The grammar requests' matchers take this step's tokens on the grammar thread, which then
        fills `next_sched`'s bitmask (the launched step with grammar rows); meanwhile the outputs
        are booked, the grammar rows' last, once their accepts are in (StepFill.wait_accepted).
        Returns that fill (StepFill.result gives the bitmask)."""
        inflight, self._inflight = self._inflight, None
        pending = inflight.pending
        sampled = pending.sampled()
        new_tokens = [(req, sampled.token_ids[row]) for req, _, _, index, row in inflight.launched
                      if index is not None and req.grammar is not None and self.requests.get(req.request_id) is req
                      ] if inflight.structured else []
        fill = None
        if new_tokens or next_sched is not None:
            grammars = [s.request.grammar for s in next_sched.scheduled if s.samples] if next_sched else []
            fill = self._bitmasks.start([(req.grammar, token_id) for req, token_id in new_tokens], grammars)
        structured_rows = []
        for req, num_new, num_computed, index, row in inflight.launched:
            if self.requests.get(req.request_id) is not req:
                continue  # aborted or finished while the step was in flight
            if pending.prompt_logprobs:
                _collect_prompt_logprobs(req, pending.prompt_logprobs.get(req.request_id))
            if req.num_computed_tokens >= num_computed:  # not preempted since
                self._book_computed(req, num_new, num_computed)
            if index is None:
                continue
            req.set_output(index, sampled.token_ids[row])
            if inflight.structured and req.grammar is not None:
                structured_rows.append((req, row, index))  # its stop rules need the grammar's accept
            else:
                self._emit_sampled(req, sampled, row, index + 1, outputs)
        if structured_rows:
            accepted = fill.wait_accepted()
            rejected = {req.request_id for (req, _), ok in zip(new_tokens, accepted) if not ok}
            for req, row, index in structured_rows:
                self._emit_sampled(req, sampled, row, index + 1, outputs, req.request_id in rejected)
        return fill

    def _update(self, sched: SchedulerOutput, result: ModelRunnerOutput, outputs: dict[str, EngineOutput]) -> None:
        sampled = result.sampled
        samplers = [s.request for s in sched.scheduled if s.samples]  # row i of `sampled`
        rejected = self._advance_grammars([
            (req, token_id) for req, token_id in zip(samplers, sampled.token_ids) if req.grammar is not None])
        row = 0
        for s in sched.scheduled:
            req = s.request
            req.num_computed_tokens += s.num_new_tokens
            self._book_computed(req, s.num_new_tokens, req.num_computed_tokens)
            if result.prompt_logprobs:
                _collect_prompt_logprobs(req, result.prompt_logprobs.get(req.request_id))
            if s.samples:
                req.append_output(sampled.token_ids[row])
                self._emit_sampled(req, sampled, row, req.num_tokens - req.num_prompt_tokens, outputs,
                                   req.request_id in rejected)
                row += 1

    def _book_computed(self, req: Request, num_new: int, num_computed: int) -> None:
        """A step computed `num_new` tokens of `req`, up to `num_computed`: register the blocks it
        filled for the prefix cache (in a decode step, one request in block_size: the integer test
        spares the others the call), and release what slid out of a window."""
        if num_computed % self.block_size < num_new:  # a block boundary lies in the computed span
            self.kv.cache_computed_blocks(req.request_id, req.all_token_ids, num_computed)
        if self._window_kv is not None:
            self._release_out_of_window(req, num_computed)

    def _release_out_of_window(self, req: Request, num_computed: int) -> None:
        """Sliding-window models: free the blocks no later query can see, except while the KV is to
        be held for another engine (it must receive, and may cache, real blocks only)."""
        if self._window_kv is not None and not (req.kv_transfer is not None and req.kv_transfer.hold):
            self._window_kv.release_out_of_window(req.request_id, num_computed)

    def _emit_sampled(self, req: Request, sampled: SamplerOutput, row: int, num_outputs: int,
                      outputs: dict[str, EngineOutput], grammar_rejected: bool = False) -> None:
        """Report row `row` of a step's sampled tokens, `req`'s `num_outputs`-th output. Runs for
        every request every step, so the common token (one that cannot end the request, of a
        request with no grammar, no KV hold and no prompt logprobs to send) is one test and one
        EngineOutput; everything else goes through `_emit`. (max_tokens is already capped by the
        context length at add_request, so it alone bounds the length here.)"""
        token_id = sampled.token_ids[row]
        top = sampled.top_logprobs[row] if sampled.top_logprobs is not None else ()
        if (num_outputs < req.max_tokens and token_id not in req.stop_token_candidates and req.grammar is None
                and req.kv_transfer is None and req.prompt_logprobs is None and req.request_id not in outputs):
            outputs[req.request_id] = EngineOutput(req.request_id, [token_id], [sampled.logprobs[row]], [top],
                                                   [sampled.ranks[row]])
            return
        token = SampledToken(token_id, sampled.logprobs[row], sampled.ranks[row], top)
        self._emit(req, token, num_outputs, outputs, grammar_rejected)

    def _emit(self, req: Request, token: SampledToken, num_outputs: int, outputs: dict[str, EngineOutput],
              grammar_rejected: bool = False) -> None:
        """Report a request's new token (its `num_outputs`-th) and finish it if that ends it. Its
        grammar, if any, has taken the token already (`_advance_grammars`)."""
        if grammar_rejected:
            # Cannot happen for a token sampled under the grammar's own mask: a bug, not input.
            logger.error("request %s: sampled token %d violates its grammar", req.request_id, token.token_id)
            self.scheduler.remove(req.request_id)
            self._reject(req, f"sampled token {token.token_id} violates the grammar", outputs, "error")
            return
        out = outputs.get(req.request_id)
        if out is None:  # the common case, built in one call: this runs for every request every step
            out = outputs[req.request_id] = EngineOutput(
                req.request_id, [token.token_id], [token.logprob], [token.top_logprobs], [token.rank])
        else:
            out.new_token_ids.append(token.token_id)
            out.new_logprobs.append(token.logprob)
            out.new_top_logprobs.append(token.top_logprobs)
            out.new_ranks.append(token.rank)
        if req.prompt_logprobs is not None and not req.prompt_logprobs_sent:
            out.new_prompt_logprobs.extend(req.prompt_logprobs)
            req.prompt_logprobs_sent = True
        status = self._stop_status(req, token.token_id, num_outputs)
        hold = req.kv_transfer is not None and req.kv_transfer.hold
        if status is None and not hold:
            return
        self.scheduler.remove(req.request_id)
        req.truncate_outputs(num_outputs)  # async: steps launched after this token are void
        if status is None:  # prefill-only request: the first token is out, hand the KV over
            out.kv_handle = self._hold(req)
        else:
            self._finish(req, status)
        self._fill_final(req, out)

    def _handle_connector_events(self, outputs: dict[str, EngineOutput]) -> None:
        if self.connector is None:
            return
        events = self.connector.poll()
        if events.saved_block_ids:
            self.kv.unpin(events.saved_block_ids)
        for request_id in events.released:
            if self.held.pop(request_id, None) is not None:
                self.kv.free(request_id)
        ended = [*events.loaded, *(request_id for request_id, _ in events.load_failed)]
        for request_id in ended:
            if self.aborting.pop(request_id, None) is not None:
                self.kv.free(request_id)
                self._kv_windows.pop(request_id, None)
        for request_id in events.loaded:
            req = self.scheduler.finish_kv_load(request_id, ok=True)
            if req is not None:
                self.kv.cache_computed_blocks(request_id, req.all_token_ids, req.num_computed_tokens)
                if request_id in self._kv_windows:  # remote KV (a host-tier restore moved no KV between engines)
                    self._kv_bytes[request_id] = events.loaded_bytes.get(request_id, 0)
                self._end_kv_window(request_id, ok=True)
        for request_id, reason in events.load_failed:
            if self.scheduler.finish_kv_load(request_id, ok=False) is not None:
                self._end_kv_window(request_id, ok=False)
                logger.warning("KV load for %s failed (%s); recomputing it here", request_id, reason)

    def _end_kv_window(self, request_id: str, ok: bool) -> None:
        if request_id in self._kv_windows:
            self._kv_windows[request_id] = (self._kv_windows[request_id][0], time.time_ns(), ok)

    # ---- finishing --------------------------------------------------------------------

    def _stop_status(self, req: Request, token_id: int, num_outputs: int) -> RequestStatus | None:
        min_tokens = req.sampling_params.min_tokens
        if token_id in req.eos_token_ids and num_outputs > min_tokens and not req.sampling_params.ignore_eos:
            return RequestStatus.FINISHED_STOPPED
        if token_id in req.sampling_params.stop_token_ids and num_outputs > min_tokens:
            req.stop_reason = token_id
            return RequestStatus.FINISHED_STOPPED
        if req.grammar is not None and req.grammar.terminated:
            return RequestStatus.FINISHED_STOPPED  # the grammar is complete: nothing may follow
        if num_outputs >= req.max_tokens or req.num_prompt_tokens + num_outputs >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _needs_exact_history(self) -> bool:
        """Penalties count previous output tokens, so they cannot run on a placeholder. (Any live
        penalised request counts, running or not: a set kept on add and finish, not a pass over
        the running requests every step.)"""
        return bool(self._penalised)

    def _finish(self, req: Request, status: RequestStatus) -> None:
        req.status = status
        req.finish_reason = status.value
        self._forget(req)
        self._retain_session(req)
        self.kv.free(req.request_id)

    def _forget(self, req: Request) -> None:
        """The request leaves this engine's live set (its blocks are the caller's business)."""
        self.requests.pop(req.request_id, None)
        self._penalised.discard(req.request_id)
        self.runner.drop_request(req.request_id)

    def _retain_session(self, req: Request) -> None:
        """A keyed request's blocks (prompt + output) outlive it at a higher priority, on both tiers."""
        if req.session is None:
            return
        hashes = self.kv.block_hashes(req.request_id)
        until_s = time.monotonic() + req.session.retention_s
        self.kv.retain_session(req.session.key, hashes, until_s)
        if self.connector is not None:
            self.connector.retain(req.session.key, hashes, until_s)

    def _save_new_blocks(self) -> None:
        """Hand newly computed full blocks to the connector (the host tier copies them out); the
        ones it reads stay pinned until poll() says their copy ended."""
        if not self.kv.track_newly_cached:
            return
        pairs = self.kv.take_newly_cached()
        if pairs:
            self.kv.pin(self.connector.save_blocks([b for b, _ in pairs], [h for _, h in pairs]))

    def _hold(self, req: Request):
        """Keep the prompt's KV blocks past the request until the decode side has copied them."""
        self._forget(req)
        block_ids = self.kv.block_ids(req.request_id)[: -(-req.num_prompt_tokens // self.block_size)]
        self.held[req.request_id] = req
        self._retain_session(req)
        return self.connector.hold(req.request_id, block_ids, req.num_prompt_tokens)

    def _fill_final(self, req: Request, out: EngineOutput) -> None:
        out.finished = True
        out.finish_reason = req.finish_reason
        out.stop_reason = req.stop_reason
        out.num_prompt_tokens = req.num_prompt_tokens
        out.num_cached_tokens = req.num_cached_tokens
        out.num_recomputed_tokens = req.num_recomputed_tokens
        out.kv_bytes_received = self._kv_bytes.pop(req.request_id, 0)
        out.kv_load_window_ns = self._kv_windows.pop(req.request_id, None)

    # ---- introspection ----------------------------------------------------------------

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(
            num_running=len(s.running), num_waiting=len(s.waiting), num_loading_kv=len(s.loading),
            num_held_kv=len(self.held), num_waiting_tokens=s.num_waiting_tokens,
            num_free_blocks=self.kv.num_free_blocks, num_total_blocks=self.kv.pool.num_blocks,
            kv_usage=self.kv.usage, prefix_hit_rate=self.kv.prefix_hit_rate, num_preemptions=s.num_preemptions,
            kv_group_blocks=self._kv_group_blocks,
        )

    def close(self) -> None:
        self.grammars.compiler.close()
        self._bitmasks.close()
        if self._trace is not None:
            self._trace.close()
        if self.connector is not None:
            self.connector.close()
        self.followers.close()


def _host_tier(config: EngineConfig, parts: EngineParts, window: int | None):
    """The host-memory KV tier of `--kv-offload-gib`, or None when it is off."""
    gib = config.cache.kv_offload_gib
    if not gib:
        return None
    if window:
        raise ConfigError("kv_offload_gib is not supported yet for models whose every layer slides a window")
    from splitserve.shared.offload.host_tier import HostTier

    block_bytes = parts.kv_cache[0].numel() * parts.kv_cache.element_size()
    num_host_blocks = int(gib * 2**30) // block_bytes
    if num_host_blocks < 1:
        raise ConfigError(f"kv_offload_gib {gib} holds no block of {block_bytes} bytes")
    logger.info("host KV tier: %d blocks (%.2f GiB)%s", num_host_blocks, num_host_blocks * block_bytes / 2**30,
                ", pinned" if parts.device.type == "cuda" else "")
    return HostTier(parts.kv_cache, num_host_blocks)
