"""Batched per-request sampling and logprobs (vLLM v1 semantics).

One call samples one token for each of N rows; every row may carry different `SamplingParams`.
Work is vectorised over the batch on whatever device the logits are on; the only per-row Python
loops build padded token tensors and draw noise from per-request generators.

Order of processing for the logits `[N, V]`:

0. structured outputs: tokens a row's grammar forbids are set to -inf (a per-row bitmask, applied
   on the device; rows without a grammar are untouched), as vLLM does before its sampler, so the
   logprobs below describe the constrained distribution.
1. logprobs: `log_softmax` of the RAW model logits (before penalties, temperature and filters),
   as vLLM v1 does by default. The sampled token's logprob, its rank and the top-n alternatives
   all come from this distribution, so they describe the model, not the sampling transform.
2. min_tokens: while `len(output) < min_tokens`, stop_token_ids and eos ids (even with ignore_eos)
   are set to -inf. Not in rows with a grammar: there the grammar decides where the output ends.
3. logit_bias: each row's bias added to its token ids' logits (as vLLM v1 does, before penalties;
   a bias cannot bring back a token the grammar forbids).
4. penalties: repetition (prompt + output tokens; positive logits divided by p, negative
   multiplied), then frequency (minus p * count in output) and presence (minus p if in output).
5. greedy rows (temperature 0): argmax (first index on ties).
6. other rows: divide by temperature, top-k, top-p (smallest set whose cumulative probability
   reaches top_p, at least the top token), min-p (drop tokens with prob < min_p * max prob; the
   ratio does not change under renormalisation, so min-p is a plain mask), then an exponential
   race: token = argmax(probs / q), q ~ Exponential(1) per token. This is equivalent to the
   Gumbel-max trick and to sampling from `probs`. Rows with a generator draw their own q, so a
   seeded request's tokens depend only on its seed and its own history, not on its batch.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace

import torch

from splitserve.shared.grammar import apply_bitmask
from splitserve.shared.sampling_params import SamplingParams


@dataclass
class SamplingInput:
    """One row to sample this step."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: torch.Generator | None
    """Per-request generator (on the logits' device) when params.seed is set; None: global RNG."""
    eos_token_ids: Collection[int] = frozenset()
    """Banned together with stop_token_ids while len(output) < min_tokens."""
    plain_greedy: bool = field(init=False)
    """Greedy, no logprobs asked, and nothing in the params that edits the logits (bias,
    penalties): once past min_tokens, the token is the logits' argmax. (The params do not change
    during a request, and the runner keeps a request's row for its life.)"""

    def __post_init__(self) -> None:
        p = self.params
        self.plain_greedy = p.greedy and p.logprobs is None and not p.penalised and not p.logit_bias

    @property
    def reads_outputs(self) -> bool:
        """Its sampling reads its output tokens (penalties, min_tokens)."""
        return bool(self.params.min_tokens) or self.params.penalised


def as_of_now(rows: list[SamplingInput]) -> list[SamplingInput]:
    """The rows with their output tokens as they are now, when some row's sampling reads them (the
    penalties then count every row's): a step sampled after the engine booked it (a deferred
    structured step) must not see the placeholder outputs the booking appended."""
    if not any([row.reads_outputs for row in rows]):
        return rows
    return [replace(row, output_token_ids=tuple(row.output_token_ids)) for row in rows]


@dataclass
class SamplerOutput:
    token_ids: list[int]
    """[N] sampled token per row."""
    logprobs: list[float]
    """[N] logprob of the sampled token under log_softmax(raw logits)."""
    top_logprobs: list[list[tuple[int, float]]] | None
    """Per row, the top `params.logprobs` (token, logprob), sorted by logprob descending; rows that
    asked for none (None or 0) get []. None when no row asked for alternatives."""
    ranks: list[int]
    """[N] 1-based rank of the sampled token: how many tokens have a logprob >= its logprob."""


@dataclass
class DeviceSample:
    """A step's sampling results still on the device: `token_ids` [N] (inputs of the next step)
    and `packed` [N, C] float64 (token, logprob, rank, top ids..., top logprobs...), which
    `unpack` turns into a `SamplerOutput` once copied to the host."""

    token_ids: torch.Tensor
    packed: torch.Tensor
    counts: list[int]
    """Top-logprob alternatives asked for by each row."""


Bitmask = tuple[torch.Tensor, torch.Tensor | list[int]]
"""A step's grammar bitmask, int32 [N, ceil(V/32)] (bit t of a row: token t allowed), and the rows
that carry a grammar, on the host or already on the logits' device (grammar_fill.BitmaskFiller)."""


class Sampler:
    """Stateless: all per-request state comes in through `SamplingInput`."""

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingInput], bitmask: Bitmask | None = None) -> SamplerOutput:
        if not rows:
            _check_inputs(logits, rows)
            return SamplerOutput(token_ids=[], logprobs=[], top_logprobs=None, ranks=[])
        sample = self.sample(logits, rows, bitmask)
        return unpack(sample.packed.tolist(), sample.counts)

    def sample(self, logits: torch.Tensor, rows: Sequence[SamplingInput], bitmask: Bitmask | None = None) -> DeviceSample:
        """Everything on the device, no host sync (the engine's async mode overlaps the next step).
        `bitmask`: (host int32 [N, ceil(V/32)], rows it constrains); the logits are masked in place."""
        _check_inputs(logits, rows)
        if bitmask is not None:
            apply_bitmask(logits, *bitmask)
        if _all_argmax_only(rows):
            # Upcasting is exact, so the argmax of bf16 logits is the argmax of their fp32 copy:
            # skip a full [N, V] conversion pass on the common greedy decode step. Not on CPU,
            # where torch's bf16 argmax is the slow one (16 x 4,096: 239 us, upcast + argmax 67).
            greedy = logits if logits.device.type != "cpu" else logits.float()
            return _pack_logprobs(None, greedy.argmax(dim=-1), rows)
        logits = logits.float()
        # A full pass over [N, V]: only when some row asked for logprobs (vLLM does the same).
        wants_logprobs = any(row.params.logprobs is not None for row in rows)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if wants_logprobs else None  # [N, V]

        processed = apply_min_tokens(logits, rows)
        processed = apply_logit_bias(processed, rows)
        processed = apply_penalties(processed, rows)
        token_ids = _choose_tokens(processed, rows)  # [N] int64
        return _pack_logprobs(raw_logprobs, token_ids, rows)


def _all_argmax_only(rows: Sequence[SamplingInput]) -> bool:
    """Every row's token is its logits' argmax: plain greedy and past min_tokens (no ban applies).
    One comprehension, no call per row in the common case (it runs every step)."""
    return all([row.plain_greedy and (not row.params.min_tokens or len(row.output_token_ids) >= row.params.min_tokens)
                for row in rows])


def apply_min_tokens(logits: torch.Tensor, rows: Sequence[SamplingInput]) -> torch.Tensor:
    """Return logits [N, V] with stop/eos ids set to -inf for rows still below min_tokens."""
    row_index: list[int] = []
    token_index: list[int] = []
    for i, row in enumerate(rows):
        if len(row.output_token_ids) >= row.params.min_tokens or row.params.structured_outputs is not None:
            continue
        # EOS is banned even with ignore_eos (vLLM counts it among the stop ids min_tokens holds back).
        banned = set(row.params.stop_token_ids)
        banned.update(row.eos_token_ids)
        banned = {t for t in banned if t < logits.shape[1]}  # ids past the vocab cannot be sampled
        row_index.extend([i] * len(banned))
        token_index.extend(sorted(banned))
    if not row_index:
        return logits
    logits = logits.clone()
    logits[_long(row_index, logits.device), _long(token_index, logits.device)] = float("-inf")
    return logits


def apply_logit_bias(logits: torch.Tensor, rows: Sequence[SamplingInput]) -> torch.Tensor:
    """Return logits [N, V] plus each row's `logit_bias` at its token ids (ids past V are skipped:
    they cannot be sampled, and the gateway rejects them against the tokenizer's vocabulary)."""
    row_index: list[int] = []
    token_index: list[int] = []
    bias: list[float] = []
    for i, row in enumerate(rows):
        for token_id, value in row.params.logit_bias.items():
            if token_id < logits.shape[1]:
                row_index.append(i)
                token_index.append(token_id)
                bias.append(value)
    if not row_index:
        return logits
    device = logits.device
    values = torch.tensor(bias, dtype=logits.dtype, device=device)
    return logits.index_put((_long(row_index, device), _long(token_index, device)), values, accumulate=True)


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingInput]) -> torch.Tensor:
    """Return logits [N, V] after repetition, frequency and presence penalties (vLLM/OpenAI).

    repetition (p != 1): for tokens seen in prompt or output, logit / p if logit > 0 else logit * p.
    frequency: logit - p * count_in_output.  presence: logit - p * (count_in_output > 0).
    """
    params = [row.params for row in rows]
    if not any(p.penalised for p in params):
        return logits
    num_rows, vocab_size = logits.shape
    device = logits.device
    output_counts = _token_counts([row.output_token_ids for row in rows], vocab_size, device)  # [N, V]
    prompt_counts = _token_counts([row.prompt_token_ids for row in rows], vocab_size, device)  # [N, V]

    repetition = _row_values([p.repetition_penalty for p in params], device)  # [N, 1]
    seen = (output_counts > 0) | (prompt_counts > 0)  # [N, V]
    penalised = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, penalised, logits)

    frequency = _row_values([p.frequency_penalty for p in params], device)
    presence = _row_values([p.presence_penalty for p in params], device)
    return logits - frequency * output_counts - presence * (output_counts > 0).float()


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask logits [N, V] outside each row's top-k, then outside its top-p nucleus, with -inf.

    top_k: [N] int64, 0 disables; top_p: [N] float32, 1.0 disables. Tokens tied with the k-th
    logit are kept. The top token always survives top-p.
    """
    vocab_size = logits.shape[1]
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)  # [N, V]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab_size), vocab_size)
    kth_logit = sorted_logits.gather(1, (k - 1).unsqueeze(1))  # [N, 1]
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_logit, float("-inf"))

    sorted_probs = sorted_logits.softmax(dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of strictly higher ranks
    # Keep a token while the tokens above it have not yet reached top_p; rows at 1.0 keep everything
    # (the cumulative sum can round to exactly 1.0 and would otherwise drop a tail of tiny tokens).
    drop = (mass_before >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_ids, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens whose probability is below min_p * (the row's max probability). min_p: [N]."""
    probs = logits.softmax(dim=-1)  # [N, V]
    threshold = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def _choose_tokens(logits: torch.Tensor, rows: Sequence[SamplingInput]) -> torch.Tensor:
    """Greedy argmax for temperature-0 rows, filtered random sampling for the rest. Returns [N]."""
    device = logits.device
    greedy_tokens = logits.argmax(dim=-1)
    random_rows = [i for i, row in enumerate(rows) if not row.params.greedy]
    if not random_rows:
        return greedy_tokens

    picked = _long(random_rows, device)
    sub_rows = [rows[i] for i in random_rows]
    params = [row.params for row in sub_rows]
    sub = logits[picked] / _row_values([p.temperature for p in params], device)  # [R, V]
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        top_k = _long([p.top_k for p in params], device)
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
        sub = apply_top_k_top_p(sub, top_k, top_p)
    if any(p.min_p > 0.0 for p in params):
        sub = apply_min_p(sub, torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device))

    probs = sub.softmax(dim=-1)  # [R, V]; filtered tokens have probability exactly 0
    noise = _exponential_noise(sub_rows, probs.shape[1], device)  # [R, V]
    tokens = greedy_tokens.clone()
    tokens[picked] = (probs / noise).argmax(dim=-1)
    return tokens


def _exponential_noise(rows: Sequence[SamplingInput], vocab_size: int, device: torch.device) -> torch.Tensor:
    """Exponential(1) noise [R, V]: own generator for seeded rows, one global draw for the rest."""
    noise = torch.empty(len(rows), vocab_size, dtype=torch.float32, device=device)
    unseeded = [i for i, row in enumerate(rows) if row.generator is None]
    if unseeded:
        noise[_long(unseeded, device)] = torch.empty(len(unseeded), vocab_size, device=device).exponential_()
    for i, row in enumerate(rows):
        if row.generator is not None:
            noise[i].exponential_(generator=row.generator)
    # q == 0 would turn a zero-probability token into 0/0 = NaN, which argmax would pick.
    return noise.clamp_(min=torch.finfo(torch.float32).tiny)


def _pack_logprobs(raw_logprobs: torch.Tensor | None, token_ids: torch.Tensor,
                   rows: Sequence[SamplingInput]) -> DeviceSample:
    """Sampled-token logprob, rank and top-n alternatives, all from log_softmax(raw logits), packed
    in one float64 tensor (exact for token ids) so they reach the host in one transfer.
    Without `raw_logprobs` (no row asked) logprobs are reported as 0.0 and ranks as 0."""
    counts = [row.params.logprobs or 0 for row in rows]
    if raw_logprobs is None:
        zeros = torch.zeros_like(token_ids, dtype=torch.float64)
        return DeviceSample(token_ids, torch.stack([token_ids.double(), zeros, zeros], dim=1), counts)
    sampled = raw_logprobs.gather(1, token_ids.unsqueeze(1))  # [N, 1]
    ranks = (raw_logprobs >= sampled).sum(dim=-1)  # [N]; ties count against the sampled token
    columns = [token_ids.double(), sampled.squeeze(1).double(), ranks.double()]
    width = min(max(counts), raw_logprobs.shape[1])
    if width > 0:
        values, ids = raw_logprobs.topk(width, dim=-1)  # [N, n]
        columns += [*ids.double().T, *values.double().T]
    return DeviceSample(token_ids, torch.stack(columns, dim=1), counts)  # packed [N, 3 + 2n]


def unpack(packed: list[list[float]], counts: list[int]) -> SamplerOutput:
    """Host side of `_pack_logprobs`: rows of (token, logprob, rank, top ids..., top logprobs...)."""
    width = (len(packed[0]) - 3) // 2 if packed else 0
    top_logprobs = None
    if width > 0:
        top_logprobs = [[(int(row[3 + j]), row[3 + width + j]) for j in range(n)] for row, n in zip(packed, counts)]
    return SamplerOutput(
        token_ids=[int(row[0]) for row in packed],
        logprobs=[row[1] for row in packed],
        top_logprobs=top_logprobs,
        ranks=[int(row[2]) for row in packed],
    )


def _token_counts(token_lists: Sequence[Sequence[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """Count each token id per row: [N, V] float32, built with one scatter_add on a padded tensor."""
    for i, tokens in enumerate(token_lists):
        if tokens and (min(tokens) < 0 or max(tokens) >= vocab_size):
            raise ValueError(f"row {i}: token ids outside [0, {vocab_size}) cannot be penalised")
    width = max((len(tokens) for tokens in token_lists), default=0)
    # Pad with vocab_size: counted into an extra column that is dropped afterwards.
    padded = [list(tokens) + [vocab_size] * (width - len(tokens)) for tokens in token_lists]
    ids = torch.tensor(padded, dtype=torch.long, device=device).view(len(token_lists), width)  # [N, L]
    counts = torch.zeros(len(token_lists), vocab_size + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab_size]


def _check_inputs(logits: torch.Tensor, rows: Sequence[SamplingInput]) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [num_rows, vocab_size], got shape {tuple(logits.shape)}")
    if logits.shape[0] != len(rows):
        raise ValueError(f"logits has {logits.shape[0]} rows but {len(rows)} sampling inputs were given")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")


def _row_values(values: Sequence[float], device: torch.device) -> torch.Tensor:
    """Per-row scalars as a [N, 1] float32 column that broadcasts over the vocabulary."""
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)


def _long(values: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)
