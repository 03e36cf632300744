"""Continuous-batching scheduler: decides *which* requests run this step and how many tokens each.

One scheduling model, no phases: every request has `num_computed_tokens` that catches up to
`num_tokens` (prompt + outputs). A prompt too long for one step's token budget is split across
steps (chunked prefill); a decode is a request one token behind; a prefix-cache hit or KV
received from a prefill instance simply starts `num_computed_tokens` higher.

Request lifecycle here:

    add ──▶ waiting ──schedule──▶ running ──finish──▶ (freed, or held for a KV transfer)
              ▲                      │
              └───────preempt────────┘   blocks freed; recomputed when scheduled again
    add(kv handle) ──▶ waiting ──blocks allocated──▶ loading ──KV landed──▶ running
                                                         └──transfer failed──▶ waiting (recompute)
    waiting, host tier holds blocks after its device hits ──▶ loading ──restored──▶ running
                                                         └──restore failed──▶ waiting (recompute)

Before a waiting request is admitted, `external_lookup` (the engine's KV connector) says how many
of its next blocks it can load; those go through `loading` like remote KV (`num_loading_tokens`).

Knows nothing of tensors: the runner turns `SchedulerOutput` into them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from collections.abc import Callable

from splitserve.shared.config import SchedulerConfig
from splitserve.shared.kv import KVCacheManager
from splitserve.shared.kv.connector import HostBlocks
from splitserve.shared.request import Request, RequestStatus


@dataclass(slots=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    samples: bool = False
    """True when this step computes the request's last known token, so a new one is sampled."""

    @classmethod
    def of(cls, request: Request, num_new_tokens: int) -> ScheduledRequest:
        """Schedule `num_new_tokens` of `request` from its current `num_computed_tokens`."""
        return cls(request, num_new_tokens, request.num_computed_tokens + num_new_tokens == request.num_tokens)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)
    kv_loads: list[tuple[Request, object, list[int] | list[list[int]]]] = field(default_factory=list)
    """(request, source, dst block ids): blocks allocated this step whose KV the connector must
    now load from `source` (a remote KvHandle, or HostBlocks); one list per group for a pool split
    by KV layer group (`allocate_load_slots`)."""

    @property
    def num_batched_tokens(self) -> int:
        return sum([s.num_new_tokens for s in self.scheduled])

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager,
                 external_lookup: Callable[[list[bytes]], int] | None = None) -> None:
        self.config = config
        self.kv = kv
        self.external_lookup = external_lookup
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.loading: dict[str, Request] = {}
        self.num_preemptions = 0

    # ---- queue management -------------------------------------------------------------

    def add(self, request: Request) -> None:
        self.waiting.append(request)
        if self.config.policy == "priority":
            self._sort_waiting()

    def remove(self, request_id: str) -> Request | None:
        """Take a request out of every queue (abort/finish). Frees nothing: the caller does."""
        for i, req in enumerate(self.running):
            if req.request_id == request_id:
                return self.running.pop(i)
        if request_id in self.loading:
            return self.loading.pop(request_id)
        for req in self.waiting:
            if req.request_id == request_id:
                self.waiting.remove(req)
                return req
        return None

    def finish_kv_load(self, request_id: str, ok: bool) -> Request | None:
        """The remote KV of a loading request landed (ok) or failed (recompute it here)."""
        req = self.loading.pop(request_id, None)
        if req is None:
            return None
        num_loaded, req.num_loading_tokens = req.num_loading_tokens, 0
        if ok:
            req.num_computed_tokens += num_loaded
            req.num_cached_tokens = max(req.num_cached_tokens, min(req.num_computed_tokens, req.num_prompt_tokens))
            req.status = RequestStatus.RUNNING
            self.running.append(req)
        else:
            # A host-tier restore keeps its blocks: recompute writes the same slots. A remote load
            # starts over from none (it had computed nothing): a split pool's sliding tables have
            # null entries where its window had slid, which a recompute from 0 cannot write.
            req.status = RequestStatus.WAITING
            req.num_recomputed_tokens += num_loaded
            if getattr(req.kv_transfer, "handle", None) is not None:
                req.kv_transfer = None
                self.kv.free(request_id)
            self.waiting.appendleft(req)
        return req

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.loading)

    @property
    def num_waiting_tokens(self) -> int:
        return sum(r.num_tokens - r.num_computed_tokens for r in self.waiting)

    # ---- the step ---------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_running(out, budget)
        if not out.preempted_ids:
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        decodes = self._schedule_decodes(budget)
        if decodes is not None:
            out.scheduled = decodes
            return budget - len(decodes)
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            scheduled = True
            needs_blocks = self.kv.num_blocks_needed(req.request_id, req.num_computed_tokens + num_new) > 0
            while needs_blocks and self.kv.allocate_slots(req.request_id, req.all_token_ids, req.num_computed_tokens, num_new) is None:
                victim = self._pick_victim()
                if self.running.index(victim) < i:
                    i -= 1  # an already scheduled request gave its blocks back
                budget += self._preempt(victim, out)
                if victim is req:
                    scheduled = False
                    break
            if scheduled:
                out.scheduled.append(ScheduledRequest.of(req, num_new))
                budget -= num_new
                i += 1
        return budget

    def _schedule_decodes(self, budget: int) -> list[ScheduledRequest] | None:
        """The common step, in one pass over the running requests: each is one token behind and
        the budget covers them all. Only a request whose next token starts a new block can need
        one (its table covers its computed tokens, and the last of them shares the next one's
        block otherwise), so only those ask the KV manager, in running order, as the general loop
        would. None when that does not hold or the pool runs short: then the general loop decides
        (who is preempted); it finds the blocks allocated here as it would have allocated them."""
        running = self.running
        if len(running) > budget or [r for r in running if r.num_tokens - r.num_computed_tokens != 1]:
            return None
        bs = self.kv.block_size
        for req in [r for r in running if r.num_computed_tokens % bs == 0]:
            if (self.kv.num_blocks_needed(req.request_id, req.num_computed_tokens + 1)
                    and self.kv.allocate_slots(req.request_id, req.all_token_ids, req.num_computed_tokens, 1) is None):
                return None
        return [ScheduledRequest(r, 1, True) for r in running]

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and self._num_active < self.config.max_num_seqs:
            req = self.waiting[0]
            if req.status is RequestStatus.WAITING_FOR_KV:
                if not self._start_kv_load(req, out):
                    return
                continue
            # Prompt logprobs need every prompt position computed: no prefix-cache hits (as vLLM).
            looked_up = (not self.kv.block_table(req.request_id) and req.num_computed_tokens == 0
                         and req.sampling_params.prompt_logprobs is None)
            # One hash pass over the prompt serves the device lookup, the host tier's and the
            # hit's check in allocate_slots (a retained turn's history is thousands of tokens).
            hashes = self.kv.lookup_hashes(req.all_token_ids) if looked_up else None
            if looked_up:  # counted in the hit rate only once the request is admitted below
                hit_blocks, num_hit = self.kv.get_computed_blocks(req.all_token_ids, False, hashes)
            else:
                hit_blocks, num_hit = [], 0
            if looked_up and self.external_lookup is not None:
                started = self._start_host_load(req, hit_blocks, num_hit, hashes, out)
                if started is not None:
                    if not started:
                        return
                    continue
            num_computed = req.num_computed_tokens + num_hit
            num_new = req.num_tokens - num_computed
            if num_new > budget:
                if not self.config.enable_chunked_prefill:
                    return
                num_new = budget
            if self.kv.allocate_slots(req.request_id, req.all_token_ids, num_computed, num_new, hit_blocks, hashes) is None:
                return
            self.waiting.popleft()
            if looked_up:
                self.kv.record_prefix_query(req.num_tokens, num_hit)
            req.num_computed_tokens = num_computed
            req.num_cached_tokens = max(req.num_cached_tokens, num_hit)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest.of(req, num_new))
            budget -= num_new

    def _start_kv_load(self, req: Request, out: SchedulerOutput) -> bool:
        """Allocate blocks for the prompt KV a prefill instance will send; no compute budget used."""
        num_kv_tokens = req.num_prompt_tokens
        block_ids = self.kv.allocate_load_slots(req.request_id, req.all_token_ids, num_kv_tokens)
        if block_ids is None:
            return False
        self.waiting.popleft()
        self.loading[req.request_id] = req
        req.num_loading_tokens = num_kv_tokens
        out.kv_loads.append((req, getattr(req.kv_transfer, "handle", None), block_ids))
        return True

    def _start_host_load(self, req: Request, hit_blocks: list[int], num_hit: int, prompt_hashes: list,
                         out: SchedulerOutput) -> bool | None:
        """None: the connector holds none of the blocks after the device hits (compute them);
        else whether the blocks for the ones it holds were allocated and their load started.
        `prompt_hashes`: the prompt's `lookup_hashes`."""
        bs = self.kv.block_size
        hashes = prompt_hashes[len(hit_blocks):]
        num_external = self.external_lookup(hashes) if hashes else 0
        if not num_external:
            return None
        num_load_tokens = num_external * bs
        table = self.kv.allocate_slots(req.request_id, req.all_token_ids, num_hit, num_load_tokens, hit_blocks,
                                       prompt_hashes)
        if table is None:
            return False
        self.waiting.popleft()
        self.kv.record_prefix_query(req.num_tokens, num_hit)
        req.num_computed_tokens = num_hit
        req.num_cached_tokens = max(req.num_cached_tokens, num_hit)
        req.num_loading_tokens = num_load_tokens
        req.status = RequestStatus.WAITING_FOR_KV
        self.loading[req.request_id] = req
        dst = table[len(hit_blocks) : len(hit_blocks) + num_external]
        out.kv_loads.append((req, HostBlocks(tuple(hashes[:num_external])), dst))
        return True

    @property
    def _num_active(self) -> int:
        return len(self.running) + len(self.loading)

    def _pick_victim(self) -> Request:
        if self.config.policy == "priority":
            return max(self.running, key=lambda r: (r.priority, r.arrival_time))
        return self.running[-1]

    def _preempt(self, req: Request, out: SchedulerOutput) -> int:
        """Free a running request's blocks and requeue it; returns token budget it gave back."""
        self.running.remove(req)
        self.kv.free(req.request_id)
        req.status = RequestStatus.WAITING
        req.num_recomputed_tokens += req.num_computed_tokens
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        if self.config.policy == "priority":
            self._sort_waiting()
        out.preempted_ids.append(req.request_id)
        refund = sum(s.num_new_tokens for s in out.scheduled if s.request is req)
        out.scheduled = [s for s in out.scheduled if s.request is not req]
        return refund

    def _sort_waiting(self) -> None:
        self.waiting = deque(sorted(self.waiting, key=lambda r: (r.priority, r.arrival_time)))
