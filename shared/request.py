"""A request's state inside one engine.

Lifecycle (one scheduling model, no phases: `num_computed_tokens` catches up to `num_tokens`):

    WAITING ──schedule──▶ RUNNING ──finish──▶ FINISHED_{STOPPED,LENGTH,ABORTED}
       ▲                     │
       └────preempt──────────┘   (blocks freed, recomputed later; prefix cache may save work)

    WAITING_FOR_KV ──KV landed──▶ RUNNING        (remote KV on a decode instance, or host-tier blocks)
          └────load failed──▶ WAITING            (recompute those tokens here)

    WAITING_FOR_GRAMMAR ──compiled──▶ WAITING or WAITING_FOR_KV   (structured outputs; not yet
          └────does not compile / timed out──▶ finished with an error     in the scheduler)
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from splitserve.shared.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_KV = "waiting_for_kv"
    WAITING_FOR_GRAMMAR = "waiting_for_grammar"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


@dataclass(frozen=True)
class SessionHint:
    """OpenAI's `prompt_cache_key` and `prompt_cache_retention`, resolved to seconds."""

    key: str
    retention_s: float


@dataclass(frozen=True)
class KvTransferParams:
    hold: bool = False
    """Prefill side: stop after the first token and hold the prompt's KV for a decode instance
    (unless that token already finished the request); the output carries the `KvHandle`."""
    handle: object | None = None
    """Decode side: a `KvHandle` to load the prompt's KV from instead of computing it."""


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int
    """Resolved output limit (sampling max_tokens capped by the context length)."""
    eos_token_ids: frozenset[int] = frozenset()
    """The model's EOS ids (they end the request unless `ignore_eos`; below min_tokens they are banned)."""
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    """Sampled tokens only: their logprobs go out in `EngineOutput` deltas and are not kept here
    (a list per token would also give the garbage collector thousands of objects to walk)."""
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache (or received from a prefill instance)."""
    num_loading_tokens: int = 0
    """Tokens whose KV a connector is loading now (remote or host tier); computed once it lands."""
    num_preemptions: int = 0
    num_recomputed_tokens: int = 0
    """Tokens computed again after a preemption or a failed KV transfer."""
    kv_transfer: KvTransferParams | None = None
    """Disaggregation parameters (a KvHandle to load, or a request to hold KV); see transfer/."""
    session: SessionHint | None = None
    """A keyed session (`prompt_cache_key`): its blocks are retained after it ends."""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    grammar: object | None = None
    """Structured outputs: the request's `RequestGrammar` (shared/grammar.py), advanced with
    every accepted output token."""
    prompt_logprobs: list | None = None
    """`SampledToken`s of prompt tokens 1.. as their steps compute them (when the request asked
    for prompt logprobs); sent once, with the first output token."""
    prompt_logprobs_sent: bool = False

    # Read for every request every step: plain attributes kept up to date by the methods below,
    # not properties (a property is a function call each time it is read).
    all_token_ids: list[int] = field(init=False, repr=False, compare=False)
    """Prompt + output token ids (the live list: change it only through the methods below)."""
    num_prompt_tokens: int = field(init=False, repr=False, compare=False)
    num_tokens: int = field(init=False, repr=False, compare=False)
    """len(all_token_ids)."""
    stop_token_candidates: frozenset[int] = field(init=False, repr=False, compare=False)
    """Token ids that may end the request (its stop ids, and the EOS ids unless ignore_eos): any
    other token cannot, which spares the engine the stop rules for most tokens."""

    def __post_init__(self) -> None:
        self.all_token_ids = self.prompt_token_ids + self.output_token_ids
        self.num_prompt_tokens = len(self.prompt_token_ids)
        self.num_tokens = len(self.all_token_ids)
        params = self.sampling_params
        self.stop_token_candidates = frozenset(params.stop_token_ids).union(
            () if params.ignore_eos else self.eos_token_ids)

    def append_output(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        self.num_tokens += 1

    def set_output(self, index: int, token_id: int) -> None:
        """Fill output `index` (a placeholder appended before its value left the device)."""
        self.output_token_ids[index] = token_id
        self.all_token_ids[self.num_prompt_tokens + index] = token_id

    def truncate_outputs(self, num_outputs: int) -> None:
        """Drop outputs past `num_outputs` (placeholders of steps launched after the request ended)."""
        del self.output_token_ids[num_outputs:], self.all_token_ids[self.num_prompt_tokens + num_outputs:]
        self.num_tokens = len(self.all_token_ids)

    def token_ids_slice(self, start: int, stop: int) -> list[int]:
        return self.all_token_ids[start:stop]
