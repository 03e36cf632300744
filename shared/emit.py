"""`Emitter`: a step's sampled tokens become `EngineOutput`s, and the requests they end leave the engine.

    emit_sampled ─▶ (the common token: one EngineOutput) or emit ─▶ stop rules ─▶ running on
                                                                             ├─▶ finish: blocks freed (or retained)
                                                                             └─▶ hold: blocks kept for the decode side

A request that ends leaves the engine's live set (`requests`, shared with the engine, which adds
to it) here, in `forget`; its final output carries its counters (`fill_final`).
"""

from __future__ import annotations

import logging

from splitserve.shared.engine_output import EngineOutput
from splitserve.shared.external_kv import ExternalKV
from splitserve.shared.grammar import unsatisfiable
from splitserve.shared.request import Request, RequestStatus
from splitserve.shared.runner import ModelRunner, SampledToken
from splitserve.shared.sampler import SamplerOutput
from splitserve.shared.scheduler import Scheduler

logger = logging.getLogger(__name__)


class Emitter:
    def __init__(self, requests: dict[str, Request], penalised: set[str], scheduler: Scheduler,
                 runner: ModelRunner, external: ExternalKV, max_model_len: int) -> None:
        self.requests = requests
        """The engine's live requests (the engine adds them; they leave in `forget`)."""
        self.penalised = penalised
        """Live requests whose sampling reads their previous tokens (see EngineCore._needs_exact_history)."""
        self.scheduler = scheduler
        self.runner = runner
        self.external = external
        self.kv = external.kv
        self.max_model_len = max_model_len

    def emit_sampled(self, req: Request, sampled: SamplerOutput, row: int, num_outputs: int,
                     outputs: dict[str, EngineOutput], grammar_rejected: bool = False) -> None:
        """Report row `row` of a step's sampled tokens, `req`'s `num_outputs`-th output. Runs for
        every request every step, so the common token (one that cannot end the request: no
        grammar, or one its token left unfinished; no KV hold, no prompt logprobs to send) is one
        test and one EngineOutput; everything else goes through `emit`. (max_tokens is already
        capped by the context length at add_request, so it alone bounds the length here.)"""
        token_id = sampled.token_ids[row]
        top = sampled.top_logprobs[row] if sampled.top_logprobs is not None else ()
        grammar = req.grammar
        if (num_outputs < req.max_tokens and token_id not in req.stop_token_candidates
                and (grammar is None or not (grammar_rejected or grammar.terminated))
                and req.kv_transfer is None and req.prompt_logprobs is None and req.request_id not in outputs):
            outputs[req.request_id] = EngineOutput(req.request_id, [token_id], [sampled.logprobs[row]], [top],
                                                   [sampled.ranks[row]])
            return
        token = SampledToken(token_id, sampled.logprobs[row], sampled.ranks[row], top)
        self.emit(req, token, num_outputs, outputs, grammar_rejected)

    def emit(self, req: Request, token: SampledToken, num_outputs: int, outputs: dict[str, EngineOutput],
             grammar_rejected: bool = False) -> None:
        """Report a request's new token (its `num_outputs`-th) and finish it if that ends it. Its
        grammar, if any, has taken the token already (shared/grammar_booking.py)."""
        if grammar_rejected:
            self.reject_by_grammar(req, token.token_id, num_outputs, outputs)
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
        status = self.stop_status(req, token.token_id, num_outputs)
        hold = req.kv_transfer is not None and req.kv_transfer.hold
        if status is None and not hold:
            return
        self.scheduler.remove(req.request_id)
        req.truncate_outputs(num_outputs)  # async: steps launched after this token are void
        if status is None:  # prefill-only request: the first token is out, hand the KV over
            self.forget(req)
            out.kv_handle = self.external.hold(req)
        else:
            self.finish(req, status)
        self.fill_final(req, out)

    def reject_by_grammar(self, req: Request, token_id: int, num_outputs: int,
                          outputs: dict[str, EngineOutput]) -> None:
        """The request's grammar refused its sampled token. If its mask allows no token at all (the
        grammar dead-ends: one whose "a" must be followed by an empty character class), no output
        satisfies it: the request's fault, a 400. Otherwise a token sampled under the grammar's own
        mask was refused: a bug."""
        self.scheduler.remove(req.request_id)
        if req.grammar.admits_no_token():
            self.reject(req, unsatisfiable(req.sampling_params.structured_outputs.kind, num_outputs - 1), outputs)
            return
        logger.error("request %s: sampled token %d violates its grammar", req.request_id, token_id)
        self.reject(req, f"sampled token {token_id} violates the grammar", outputs, "error")

    def stop_status(self, req: Request, token_id: int, num_outputs: int) -> RequestStatus | None:
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

    def reject(self, req: Request, message: str, outputs: dict[str, EngineOutput], reason: str = "abort") -> None:
        """End a request that cannot go on; 'abort': as given (a 400), 'error': an engine fault,
        'busy': the engine could not take it in time (AsyncEngine's EngineBusyError: try again)."""
        self.finish(req, RequestStatus.FINISHED_ABORTED)
        outputs[req.request_id] = EngineOutput(req.request_id, finished=True, finish_reason=reason, error=message)

    def finish(self, req: Request, status: RequestStatus) -> None:
        req.status = status
        req.finish_reason = status.value
        self.forget(req)
        self.external.retain_session(req)
        self.kv.free(req.request_id)

    def forget(self, req: Request) -> None:
        """The request leaves this engine's live set (its blocks are the caller's business)."""
        self.requests.pop(req.request_id, None)
        self.penalised.discard(req.request_id)
        self.runner.drop_request(req.request_id)

    def fill_final(self, req: Request, out: EngineOutput) -> None:
        out.finished = True
        out.finish_reason = req.finish_reason
        out.stop_reason = req.stop_reason
        out.num_prompt_tokens = req.num_prompt_tokens
        out.num_cached_tokens = req.num_cached_tokens
        out.num_recomputed_tokens = req.num_recomputed_tokens
        out.kv_bytes_received = self.external.kv_bytes.pop(req.request_id, 0)
        out.kv_load_window_ns = self.external.kv_windows.pop(req.request_id, None)
