"""The engine: one synchronous step loop, used by every service and by the offline `LLM` API.

    step():  connector events ─▶ schedule ─▶ start KV loads ─▶ run + sample ─▶ update ─▶ save
             new blocks ─▶ outputs

External KV (KV that lives outside this engine's device pool: another engine's, the host tier)
goes through one `KVConnector` (shared/kv/connector.py), called at fixed points: lookup inside
scheduling, start_load after it, save_blocks for newly computed blocks, hold for a finished
prefill, retain for a keyed session's blocks, poll at the top of each step, abort.

The loop and the booking of computed tokens live here; the rest, one concept a file:
    shared/external_kv.py     `ExternalKV`: the connector's events, loads, holds, saves, retention
    shared/emit.py            `Emitter`: sampled tokens to `EngineOutput`s, stop rules, finishing
    shared/grammar_booking.py structured outputs: grammar admission, step bitmasks, accepts
    shared/engine_output.py   `EngineOutput`, `EngineStats` (what crosses to the serving process)

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
from dataclasses import dataclass

import torch

from splitserve.shared.config import EngineConfig
from splitserve.shared.cuda_graphs import DecodeGraphs
from splitserve.shared.emit import Emitter
from splitserve.shared.engine_output import EngineOutput, EngineStats, RequestError
from splitserve.shared.engine_parts import EngineParts, build_engine_parts
from splitserve.shared.external_kv import ExternalKV, build_host_tier
from splitserve.shared.grammar import GrammarCompiler, GrammarWaitlist
from splitserve.shared.grammar_booking import accept_sampled, admit_compiled, rejected_ids, start_fill, step_bitmask
from splitserve.shared.grammar_fill import StepFill, make_filler
from splitserve.shared.heap import freeze_startup_heap
from splitserve.shared.kv import KVCacheManager
from splitserve.shared.kv.connector import CompositeConnector
from splitserve.shared.kv.layer_groups import GroupedKVCacheManager
from splitserve.shared.kv.sliding_window import SlidingWindowKVCacheManager
from splitserve.shared.parallel.driver import check_parallel_support
from splitserve.shared.parallel.state import ParallelError
from splitserve.shared.prompt_logprobs import collect_prompt_logprobs
from splitserve.shared.request import KvTransferParams, Request, RequestStatus, SessionHint
from splitserve.shared.runner import PLACEHOLDER, ModelRunner, ModelRunnerOutput, PendingStep, SampledToken
from splitserve.shared.sampling_params import SamplingParams
from splitserve.shared.scheduler import Scheduler, SchedulerOutput
from splitserve.shared.step_trace import StepTrace

logger = logging.getLogger(__name__)


MAX_FAILED_STEPS = 3
"""Consecutive failing steps after which the engine itself is taken to be broken."""


@dataclass
class InflightStep:
    """Async scheduling: a launched step whose tokens are still on the device."""

    pending: PendingStep
    launched: list[tuple[Request, int, int, int | None, int | None]]
    """(request, its new tokens in this step, its computed tokens after it, index of its placeholder
    output and its row in `pending`, or None twice when it samples nothing)."""
    structured: bool = False
    """Some row samples under a grammar (its matcher takes the token when the step settles)."""
    fill: StepFill | None = None
    """A structured step launched without its sampling: its bitmask, filling on the grammar thread
    (sampled at the next step, once that step's inputs are staged: `_sample_deferred`)."""


def _is_device_fault(exc: BaseException) -> bool:
    """A fault of the device or its memory rather than of one request (a tensor-parallel rank that
    died or timed out counts): the engine cannot go on."""
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError, ParallelError)):
        return True
    accelerator_error = getattr(torch, "AcceleratorError", None)
    return (accelerator_error is not None and isinstance(exc, accelerator_error)) or "CUDA" in str(exc)


class EngineCore:
    def __init__(self, config: EngineConfig, connector_factory=None) -> None:
        config.validate()
        check_parallel_support(config)
        self.config = config
        # The host tier moves whole one-pool blocks: no layer-group split with it (the P/D transfer
        # moves each group's blocks, shared/transfer/).
        cc = config.cache
        parts: EngineParts = build_engine_parts(config, cc.split_kv_by_layer_group and not cc.kv_offload_gib)
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
        tier = build_host_tier(config, parts, window)
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
        self._external = ExternalKV(self.connector, self.kv, self.scheduler, self.block_size)
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
        self._emitter = Emitter(self.requests, self._penalised, self.scheduler, self.runner, self._external,
                                self.max_model_len)
        self.async_scheduling = config.scheduler.async_scheduling
        if self.async_scheduling is None:  # off with followers: they need every step's real input tokens
            self.async_scheduling = parts.device.type == "cuda" and parts.followers.world_size == 1
        self._inflight: InflightStep | None = None
        self._step_request_ids: list[str] | None = None  # the running step's requests, once scheduled
        self._step_tokens = 0
        self._failed_steps = 0
        if parts.device.type == "cuda":  # on CPU tests build many engines in one process: no freezing
            freeze_startup_heap()
        backend = config.scheduler.structured_outputs_backend
        compiler = GrammarCompiler(parts.model_dir, parts.info.vocab_size, backend=backend,
                                   eos_token_ids=sorted(self.model_info.eos_token_ids),
                                   timeout_s=config.scheduler.grammar_compile_timeout_s)
        self.grammars = GrammarWaitlist(compiler)
        self._bitmasks = make_filler(backend, parts.info.vocab_size, parts.device,
                                     config.scheduler.structured_outputs_threads)
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
        if params.penalised:
            self._penalised.add(request_id)
        if params.structured_outputs is None:
            self.scheduler.add(req)
            return
        self.grammars.add(req)  # compiled on the compiler's thread; scheduled once it is ready

    def _validate(self, request_id: str, prompt_token_ids: list[int]) -> None:
        if request_id in self.requests or request_id in self._external.held:
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
        if request_id in self._external.held:
            self.connector.abort(request_id)  # blocks are freed when the connector reports them released
            return True
        req = self.requests.get(request_id)
        if req is None:
            return False
        self.scheduler.remove(request_id)
        self.grammars.remove(request_id)
        if req.status is RequestStatus.WAITING_FOR_KV and self.kv.block_ids(request_id):
            self._external.abort_load(req)
            self._emitter.forget(req)
            req.status = RequestStatus.FINISHED_ABORTED
            return True
        self._emitter.finish(req, RequestStatus.FINISHED_ABORTED)
        self._external.forget(request_id)
        return True

    def has_unfinished_requests(self) -> bool:
        return (bool(self.requests) or bool(self._external.held) or bool(self._external.aborting)
                or self._inflight is not None or self.kv.num_pinned_blocks > 0)

    def waits_on_connector_only(self) -> bool:
        """Nothing to step until the connector reports: every live request is loading KV (or none
        is live, and only holds, aborted loads or host-tier copies remain)."""
        s = self.scheduler
        return not s.running and not s.waiting and not self.grammars and self._inflight is None

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
        self._external.poll()
        if self.grammars:
            admit_compiled(self.grammars, self.scheduler, self._emitter, outputs)
        if self._inflight is not None and self._needs_exact_history():
            self._sample_deferred()
            self._resolve(outputs)  # penalties read the real previous tokens: no overlap this step
        self.kv.sessions.expire(time.monotonic())
        sched = self.scheduler.schedule()
        request_ids = self._step_request_ids = [s.request.request_id for s in sched.scheduled]
        if self._trace is not None:
            self._step_tokens = sched.num_batched_tokens
        if sched.kv_loads:
            self._external.start_loads(sched.kv_loads)
        tables = self.kv.block_table_arrays(request_ids)
        if not self.async_scheduling:
            result = self.runner.execute(sched, tables, step_bitmask(self._bitmasks, sched))
            self._update(sched, result, outputs)
            self._external.save_new_blocks()
            return list(outputs.values())
        # Async: launch this step first, then settle the previous one while the device works.
        # A step with grammar rows launches its forward only: its bitmask needs the previous
        # step's tokens. The grammar thread takes those tokens and fills the bitmask while the
        # previous step is booked (see _resolve), and while the next step is scheduled and its
        # inputs staged; only then is the step sampled, right before the next forward is
        # launched, so the device waits for no host work but the bitmask.
        previous = self._inflight
        structured = any([s.samples and s.request.grammar is not None for s in sched.scheduled])
        staged = self.runner.stage_inputs(sched, tables) if not sched.is_empty else None
        self._sample_deferred()
        pending = self.runner.execute_async(sched, tables, previous.pending if previous else None,
                                            defer_sampling=structured, staged=staged)
        launched = self._advance(sched)
        fill = None
        if previous is not None:
            fill = self._resolve(outputs, sched if structured else None)
            self._external.save_new_blocks()
        if structured and fill is None:  # no settled step handed the grammar thread this bitmask
            fill = self._bitmasks.start([], [s.request.grammar for s in sched.scheduled if s.samples])
        self._inflight = InflightStep(pending, launched, structured, fill if structured else None) if launched else None
        if structured and not launched:
            self._bitmasks.wait()  # nothing of the step is left to sample (every request ended)
        return list(outputs.values())

    def _sample_deferred(self) -> None:
        """Sample the in-flight step that waited for its grammar bitmask (see _step)."""
        inflight = self._inflight
        if inflight is not None and inflight.fill is not None:
            fill, inflight.fill = inflight.fill, None
            self.runner.sample(inflight.pending, fill.result())

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
        fill, new_tokens = None, []
        if inflight.structured or next_sched is not None:  # grammar rows settle here, or launch next
            grammar_launched = inflight.launched if inflight.structured else []
            fill, new_tokens = start_fill(self._bitmasks, grammar_launched, sampled, self.requests, next_sched)
        structured_rows = []
        for req, num_new, num_computed, index, row in inflight.launched:
            if self.requests.get(req.request_id) is not req:
                continue  # aborted or finished while the step was in flight
            if pending.prompt_logprobs:
                collect_prompt_logprobs(req, pending.prompt_logprobs.get(req.request_id))
            if req.num_computed_tokens >= num_computed:  # not preempted since
                self._book_computed(req, num_new, num_computed)
            if index is None:
                continue
            req.set_output(index, sampled.token_ids[row])
            if inflight.structured and req.grammar is not None:
                structured_rows.append((req, row, index))  # its stop rules need the grammar's accept
            else:
                self._emitter.emit_sampled(req, sampled, row, index + 1, outputs)
        if structured_rows:
            rejected = rejected_ids(fill, new_tokens)
            for req, row, index in structured_rows:
                self._emitter.emit_sampled(req, sampled, row, index + 1, outputs, req.request_id in rejected)
        return fill

    def _update(self, sched: SchedulerOutput, result: ModelRunnerOutput, outputs: dict[str, EngineOutput]) -> None:
        sampled = result.sampled
        rejected = accept_sampled(self._bitmasks, sched, sampled)
        row = 0
        for s in sched.scheduled:
            req = s.request
            req.num_computed_tokens += s.num_new_tokens
            self._book_computed(req, s.num_new_tokens, req.num_computed_tokens)
            if result.prompt_logprobs:
                collect_prompt_logprobs(req, result.prompt_logprobs.get(req.request_id))
            if s.samples:
                req.append_output(sampled.token_ids[row])
                self._emitter.emit_sampled(req, sampled, row, req.num_tokens - req.num_prompt_tokens, outputs,
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
        be held for another engine that takes every block of it (it must receive, and may cache,
        real blocks only); a pool split by layer group hands out only what the windows still see."""
        held = req.kv_transfer is not None and req.kv_transfer.hold
        if self._window_kv is not None and not (held and not self.kv.sends_window_blocks_only):
            self._window_kv.release_out_of_window(req.request_id, num_computed)

    def _needs_exact_history(self) -> bool:
        """Penalties count previous output tokens, so they cannot run on a placeholder. (Any live
        penalised request counts, running or not: a set kept on add and finish, not a pass over
        the running requests every step.)"""
        return bool(self._penalised)

    # ---- introspection ----------------------------------------------------------------

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(
            num_running=len(s.running), num_waiting=len(s.waiting), num_loading_kv=len(s.loading),
            num_held_kv=len(self._external.held), num_waiting_tokens=s.num_waiting_tokens,
            num_free_blocks=self.kv.num_free_blocks, num_total_blocks=self.kv.pool.num_blocks,
            kv_usage=self.kv.usage, prefix_hit_rate=self.kv.prefix_hit_rate, num_preemptions=s.num_preemptions,
            kv_group_blocks=self._kv_group_blocks,
            kv_group_free_blocks=dict(zip(self._kv_group_blocks, self.kv.group_free_blocks())),
        )

    def close(self) -> None:
        self.grammars.compiler.close()
        self._bitmasks.close()
        if self._trace is not None:
            self._trace.close()
        self._external.close()
        self.followers.close()

