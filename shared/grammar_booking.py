"""The engine's structured-output booking: which requests' grammars are ready, the bitmask of a
step's sampling rows, and which sampled tokens their grammars took.

    synchronous step:  step_bitmask ─▶ run + sample ─▶ accept_sampled ─▶ outputs
    async step N+1:    start_fill (step N's tokens into the matchers, then N+1's bitmask, on the
                       grammar pool) ─▶ book step N's other rows ─▶ rejected_ids ─▶ its grammar rows

Every sampled token of a grammar request is taken by its matcher before that request's output is
built (its stop rules read `RequestGrammar.terminated`).
"""

from __future__ import annotations

from splitserve.shared.emit import Emitter
from splitserve.shared.engine_output import EngineOutput
from splitserve.shared.grammar import GrammarWaitlist
from splitserve.shared.grammar_fill import BitmaskFiller, StepFill
from splitserve.shared.request import Request
from splitserve.shared.sampler import SamplerOutput
from splitserve.shared.scheduler import Scheduler, SchedulerOutput


def admit_compiled(grammars: GrammarWaitlist, scheduler: Scheduler, emitter: Emitter,
                   outputs: dict[str, EngineOutput]) -> None:
    """Requests whose grammar is ready join the scheduler; those that cannot have one fail."""
    ready, failed = grammars.poll()
    for req, message, reason in failed:
        emitter.reject(req, message, outputs, reason)
    for req in ready:
        scheduler.add(req)


def step_bitmask(bitmasks: BitmaskFiller, sched: SchedulerOutput):
    """The bitmask of this step's sampling rows, in the runner's row order (None: no grammar)."""
    return bitmasks.build([s.request.grammar for s in sched.scheduled if s.samples])


def accept_sampled(bitmasks: BitmaskFiller, sched: SchedulerOutput, sampled: SamplerOutput) -> set[str]:
    """Synchronous steps: advance each grammar's matcher by its request's new token, before any
    output is built; the requests whose grammar rejects it. (Async steps: start_fill.)"""
    samplers = [s.request for s in sched.scheduled if s.samples]  # row i of `sampled`
    new_tokens = [(req, token_id) for req, token_id in zip(samplers, sampled.token_ids) if req.grammar is not None]
    accepted = bitmasks.accept([(req.grammar, token_id) for req, token_id in new_tokens])
    return {req.request_id for (req, _), ok in zip(new_tokens, accepted) if not ok}


def start_fill(bitmasks: BitmaskFiller, launched: list, sampled: SamplerOutput, requests: dict[str, Request],
               next_sched: SchedulerOutput | None) -> tuple[StepFill | None, list[tuple[Request, int]]]:
    """Async steps: hand the grammar pool the settled step's tokens of its live grammar rows
    (`launched`: InflightStep.launched) and then `next_sched`'s bitmask; (that fill, or None when
    there is nothing to do, and the (request, token) pairs it accepts)."""
    new_tokens = [(req, sampled.token_ids[row]) for req, _, _, index, row in launched
                  if index is not None and req.grammar is not None and requests.get(req.request_id) is req]
    if not new_tokens and next_sched is None:
        return None, new_tokens
    grammars = [s.request.grammar for s in next_sched.scheduled if s.samples] if next_sched else []
    return bitmasks.start([(req.grammar, token_id) for req, token_id in new_tokens], grammars), new_tokens


def rejected_ids(fill: StepFill, new_tokens: list[tuple[Request, int]]) -> set[str]:
    """Wait for `fill`'s accepts; the requests whose grammar rejected its token. If there are
    any, wait for the fill too: the emitter reads a rejecting grammar's mask (admits_no_token)."""
    accepted = fill.wait_accepted()
    if all(accepted):  # the rule: a grammar's mask let only its tokens through
        return set()
    fill.filler.wait()
    return {req.request_id for (req, _), ok in zip(new_tokens, accepted) if not ok}
