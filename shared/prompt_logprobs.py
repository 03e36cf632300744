"""Prompt logprobs (vLLM's `prompt_logprobs`): how likely the model found each prompt token.

The hidden state at prompt position p predicts prompt token p + 1, so a step that computes
positions [start, start + n) of a prompt of P tokens yields the logprobs of prompt tokens
start + 1 .. min(start + n, P - 1). Token 0 has none (nothing precedes it). Like the sampler's
logprobs, they come from log_softmax of the raw logits, with the token's rank (how many tokens
have a logprob >= its own) and the top-k alternatives.

Only requests that ask pay: their rows go through the LM head a second time here (a prompt
step otherwise computes logits of its last row only). Chunked prefill spreads them over steps;
the engine collects them on the request and sends them with the first output token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from splitserve.shared.request import Request
from splitserve.shared.scheduler import SchedulerOutput

if TYPE_CHECKING:
    from splitserve.shared.runner import SampledToken  # runner imports this module


@dataclass
class PromptRows:
    """The prompt tokens one request's chunk scores this step."""

    request_id: str
    first_target: int
    """Index in the prompt of the first token scored (>= 1)."""
    rows: list[int]
    """Rows of the flat batch whose hidden states predict them, in order."""
    target_ids: list[int]
    num_top: int


def prompt_rows(sched: SchedulerOutput) -> list[PromptRows]:
    """Which rows of this step score prompt tokens, for the requests that asked."""
    found, offset = [], 0
    for s in sched.scheduled:
        req, start = s.request, s.request.num_computed_tokens
        k = req.sampling_params.prompt_logprobs
        if k is not None:  # most requests did not ask: nothing else is computed for them
            last_target = min(start + s.num_new_tokens, req.num_prompt_tokens - 1)
            if last_target > start:
                targets = req.prompt_token_ids[start + 1:last_target + 1]
                found.append(PromptRows(req.request_id, start + 1, list(range(offset, offset + len(targets))),
                                        targets, k))
        offset += s.num_new_tokens
    return found


@torch.inference_mode()
def compute_prompt_logprobs(logits_of: Callable[[list[int]], torch.Tensor], wanted: list[PromptRows]) -> dict:
    """request id -> (first target index, [SampledToken of each scored prompt token]); `logits_of(rows)`
    is the LM head over those rows of the step's hidden states."""
    from splitserve.shared.runner import SampledToken

    results = {}
    for w in wanted:
        logprobs = torch.log_softmax(logits_of(w.rows).float(), dim=-1)  # [R, V]
        targets = torch.tensor(w.target_ids, device=logprobs.device)
        chosen = logprobs.gather(1, targets[:, None])  # [R, 1]
        ranks = (logprobs >= chosen).sum(dim=-1).tolist()
        top_lp, top_ids = logprobs.topk(w.num_top, dim=-1) if w.num_top else (None, None)
        tops = ([list(zip(i, lp)) for i, lp in zip(top_ids.tolist(), top_lp.tolist())] if w.num_top
                else [()] * len(w.rows))
        results[w.request_id] = (w.first_target, [
            SampledToken(t, lp, r, top) for t, lp, r, top in zip(w.target_ids, chosen[:, 0].tolist(), ranks, tops)])
    return results


def collect_prompt_logprobs(req: Request, scored: tuple[int, list[SampledToken]] | None) -> None:
    """Keep the prompt logprobs a step computed; positions seen before (a preempted request
    computes its prompt again) are not added twice."""
    if scored is None:
        return
    first_target, entries = scored
    if req.prompt_logprobs is None:
        req.prompt_logprobs = []
    req.prompt_logprobs.extend(entries[len(req.prompt_logprobs) + 1 - first_target:])
