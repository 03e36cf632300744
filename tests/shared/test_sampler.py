"""Tests for the batched sampler: greedy, penalties, seeds, filters, temperature, logprobs, min_tokens."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from splitserve.shared.sampler import Sampler, SamplingInput, apply_logit_bias, apply_penalties
from splitserve.shared.sampling_params import SamplingParams

# A crafted distribution with no ties, so every filter's support is unambiguous.
PROBS = [0.30, 0.20, 0.15, 0.12, 0.09, 0.07, 0.05, 0.02]


def row(params: SamplingParams, prompt=(), output=(), seed: int | None = None, eos=frozenset()) -> SamplingInput:
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return SamplingInput(params=params, prompt_token_ids=list(prompt), output_token_ids=list(output),
                         generator=generator, eos_token_ids=tuple(eos))  # a tuple, as the engine passes


def crafted_logits(num_rows: int) -> torch.Tensor:
    return torch.tensor(PROBS).log().expand(num_rows, -1).clone()  # [N, 8]


def sample_counts(params: SamplingParams, num_draws: int, seed: int = 0) -> Counter:
    """Sample num_draws identical rows of the crafted distribution in one call (global RNG)."""
    torch.manual_seed(seed)
    out = Sampler()(crafted_logits(num_draws), [row(params) for _ in range(num_draws)])
    return Counter(out.token_ids)


def chi_square(counts: Counter, expected_probs: dict[int, float]) -> float:
    total = sum(counts.values())
    return sum((counts.get(t, 0) - total * p) ** 2 / (total * p) for t, p in expected_probs.items())


def renormalised(weights: dict[int, float]) -> dict[int, float]:
    total = sum(weights.values())
    return {t: w / total for t, w in weights.items()}


# ---------------------------------------------------------------- greedy and penalties


def test_greedy_is_argmax_with_first_index_on_ties():
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(1))
    logits[5] = 0.0
    logits[5, 7] = logits[5, 30] = 3.0  # tie: the first index wins
    out = Sampler()(logits, [row(SamplingParams(temperature=0.0)) for _ in range(6)])
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.token_ids[5] == 7


def test_greedy_on_bf16_logits_takes_the_fast_path_and_matches_the_fp32_path():
    """Plain greedy rows are argmaxed in the logits' own dtype; a row asking for logprobs sends the
    batch through the fp32 path. Both must pick the same tokens, ties included."""
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    logits[::7, 11] = logits[::7, 250] = 9.0  # ties in bf16: the first index wins
    plain = Sampler()(logits, [row(SamplingParams(temperature=0.0)) for _ in range(64)])
    with_logprobs = Sampler()(logits, [row(SamplingParams(temperature=0.0, logprobs=0))] +
                              [row(SamplingParams(temperature=0.0)) for _ in range(63)])
    assert plain.token_ids == with_logprobs.token_ids == logits.float().argmax(dim=-1).tolist()
    assert all(plain.token_ids[i] == 11 for i in range(0, 64, 7))
    assert plain.logprobs == [0.0] * 64 and with_logprobs.logprobs[0] < 0.0


def reference_penalties(logits: list[float], params: SamplingParams, prompt, output) -> list[float]:
    """Straightforward per-token implementation of the vLLM / OpenAI formulas."""
    result = []
    for token, logit in enumerate(logits):
        if token in prompt or token in output:
            p = params.repetition_penalty
            logit = logit / p if logit > 0 else logit * p
        count = list(output).count(token)
        logit -= params.frequency_penalty * count
        logit -= params.presence_penalty * (1.0 if count > 0 else 0.0)
        result.append(logit)
    return result


def test_apply_penalties_matches_reference_formulas():
    gen = torch.Generator().manual_seed(3)
    vocab_size = 12
    logits = torch.randn(4, vocab_size, generator=gen) * 3
    rows = [
        row(SamplingParams(repetition_penalty=1.7), prompt=[0, 1, 1, 5], output=[2, 2, 9]),
        row(SamplingParams(frequency_penalty=0.6), prompt=[3], output=[4, 4, 4, 7]),
        row(SamplingParams(presence_penalty=-1.2, frequency_penalty=-0.3, repetition_penalty=0.8),
            prompt=[11, 0], output=[0, 6, 6, 11, 3]),
        row(SamplingParams(), prompt=[1, 2], output=[3]),  # no penalties: untouched
    ]
    got = apply_penalties(logits, rows)
    for i, r in enumerate(rows):
        expected = reference_penalties(logits[i].tolist(), r.params, r.prompt_token_ids, r.output_token_ids)
        assert got[i].tolist() == pytest.approx(expected, abs=1e-5)
    assert torch.equal(got[3], logits[3])
    assert not torch.equal(got[0], logits[0])


def test_greedy_follows_penalised_logits():
    logits = torch.tensor([[2.0, 1.9, -0.5, 0.3]] * 3)
    rows = [
        # frequency: token 0 appears twice in the output -> 2.0 - 2 * 0.1 = 1.8 < 1.9
        row(SamplingParams(temperature=0.0, frequency_penalty=0.1), output=[0, 0]),
        # repetition over the prompt: 2.0 / 1.1 = 1.82 < 1.9 even though token 0 is not in the output
        row(SamplingParams(temperature=0.0, repetition_penalty=1.1), prompt=[0]),
        # presence only counts the output, so a prompt token is not penalised
        row(SamplingParams(temperature=0.0, presence_penalty=2.0), prompt=[0]),
    ]
    assert Sampler()(logits, rows).token_ids == [1, 1, 0]


# ---------------------------------------------------------------- seeds


def step_logits(step: int, vocab_size: int = 64) -> torch.Tensor:
    return torch.randn(vocab_size, generator=torch.Generator().manual_seed(1000 + step))


def run_seeded(seed: int, position: int, batch_size: int, num_steps: int = 50) -> list[int]:
    """Generate num_steps tokens for a seeded request placed at `position` among other rows."""
    sampler = Sampler()
    target = row(SamplingParams(temperature=1.0, top_k=20, frequency_penalty=0.2), seed=seed)
    others = [row(SamplingParams(temperature=0.8)), row(SamplingParams(temperature=0.0)),
              row(SamplingParams(temperature=1.2), seed=seed + 1 + position)]
    tokens: list[int] = []
    for step in range(num_steps):
        batch = [others[i % len(others)] for i in range(batch_size - 1)]
        batch.insert(position, target)
        logits = torch.stack([step_logits(step) if r is target else torch.randn(64) for r in batch])
        tokens.append(sampler(logits, batch).token_ids[position])
        target.output_token_ids.append(tokens[-1])
    return tokens


def test_seeded_request_is_reproducible_regardless_of_batch():
    alone = run_seeded(seed=42, position=0, batch_size=1)
    assert run_seeded(seed=42, position=0, batch_size=1) == alone
    assert run_seeded(seed=42, position=2, batch_size=5) == alone
    assert run_seeded(seed=42, position=3, batch_size=4) == alone
    assert run_seeded(seed=43, position=0, batch_size=1) != alone


# ---------------------------------------------------------------- filters and frequencies


@pytest.mark.parametrize("params, support", [
    (SamplingParams(top_k=3), {0, 1, 2}),
    (SamplingParams(top_p=0.7), {0, 1, 2, 3}),      # 0.30+0.20+0.15 = 0.65 < 0.7 <= 0.77
    (SamplingParams(top_p=0.65 - 1e-4), {0, 1, 2}),
    (SamplingParams(top_p=0.01), {0}),               # at least the top token
    (SamplingParams(min_p=0.25), {0, 1, 2, 3, 4}),   # prob >= 0.075
    (SamplingParams(top_k=5, top_p=0.8, min_p=0.6), {0, 1}),  # top-k/p keep 0..3; min-p: prob >= 0.18
    (SamplingParams(top_k=5, top_p=0.8), {0, 1, 2, 3}),  # top-p on the top-k renormalised probs
    (SamplingParams(), set(range(8))),
])
def test_filters_restrict_support_and_match_renormalised_frequencies(params, support):
    counts = sample_counts(params, num_draws=20_000)
    assert set(counts) == support
    if len(support) > 1:
        expected = renormalised({t: PROBS[t] for t in support})
        # df <= 7; the 1e-6 tail of chi2(7) is about 35.
        assert chi_square(counts, expected) < 35


def test_top_k_with_per_request_generators_matches_distribution():
    params = SamplingParams(top_k=4)
    rows = [row(params, seed=s) for s in range(3000)]
    out = Sampler()(crafted_logits(len(rows)), rows)
    counts = Counter(out.token_ids)
    assert set(counts) == {0, 1, 2, 3}
    assert chi_square(counts, renormalised({t: PROBS[t] for t in range(4)})) < 35


def test_temperature_rescales_distribution():
    temperature = 2.0
    counts = sample_counts(SamplingParams(temperature=temperature), num_draws=20_000, seed=5)
    expected = renormalised({t: p ** (1 / temperature) for t, p in enumerate(PROBS)})
    assert chi_square(counts, expected) < 35


def test_low_temperature_concentrates_on_top_token():
    counts = sample_counts(SamplingParams(temperature=0.05), num_draws=5_000, seed=6)
    assert counts[0] / 5_000 > 0.99
    spread = sample_counts(SamplingParams(temperature=1.0), num_draws=5_000, seed=6)
    assert spread[0] / 5_000 < 0.4


# ---------------------------------------------------------------- logprobs


def test_logprobs_come_from_raw_logits():
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(5, 50, generator=gen) * 2
    rows = [
        row(SamplingParams(temperature=0.7, top_k=10, frequency_penalty=1.0, logprobs=5), output=[1, 2, 2], seed=1),
        row(SamplingParams(temperature=0.0, repetition_penalty=1.5, logprobs=0), prompt=[3, 4]),
        row(SamplingParams(temperature=1.3, top_p=0.9, logprobs=20), seed=2),
        row(SamplingParams(min_p=0.1), seed=3),
        row(SamplingParams(temperature=0.0, logprobs=1)),
    ]
    out = Sampler()(logits, rows)
    raw = torch.log_softmax(logits, dim=-1)
    for i, token in enumerate(out.token_ids):
        assert out.logprobs[i] == pytest.approx(raw[i, token].item(), abs=1e-6)
        assert out.ranks[i] == 1 + int((raw[i] > raw[i, token]).sum())
    assert out.ranks[4] == 1  # greedy without penalties picks the top raw token
    assert [len(alternatives) for alternatives in out.top_logprobs] == [5, 0, 20, 0, 1]
    for i, alternatives in enumerate(out.top_logprobs):
        values = [lp for _, lp in alternatives]
        assert values == sorted(values, reverse=True)
        top_values, top_ids = raw[i].topk(len(alternatives))
        assert [t for t, _ in alternatives] == top_ids.tolist()
        assert values == pytest.approx(top_values.tolist(), abs=1e-6)


def test_logprobs_skipped_when_no_row_asks():
    out = Sampler()(torch.randn(3, 50), [row(SamplingParams(temperature=0.0)) for _ in range(3)])
    assert out.logprobs == [0.0] * 3 and out.ranks == [0] * 3 and out.top_logprobs is None


def test_top_logprobs_is_none_when_no_row_asks():
    rows = [row(SamplingParams(logprobs=0)), row(SamplingParams())]
    out = Sampler()(torch.randn(2, 10), rows)
    assert out.top_logprobs is None
    assert len(out.logprobs) == len(out.ranks) == 2


# ---------------------------------------------------------------- min_tokens


def test_min_tokens_bans_eos_and_stop_ids_until_reached():
    eos, stop = 5, 6
    logits = torch.zeros(4, 8)
    logits[:, eos] = 20.0
    logits[:, stop] = 19.0
    rows = [
        row(SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[stop], logprobs=0), output=[1, 2], eos={eos}),
        row(SamplingParams(temperature=1.0, min_tokens=3, stop_token_ids=[stop]), output=[1], eos={eos}, seed=0),
        row(SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[stop]), output=[1, 2, 3], eos={eos}),
        row(SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[stop], ignore_eos=True), eos={eos}),
    ]
    out = Sampler()(logits, rows)
    assert out.token_ids[0] not in (eos, stop)
    assert out.token_ids[1] not in (eos, stop)
    assert out.token_ids[2] == eos  # min_tokens reached: no longer banned
    # ignore_eos: EOS does not stop the request, but min_tokens still holds it back, as vLLM 0.32
    # does (tests/vllm_diff: cmpl_ignore_eos_min_tokens).
    assert out.token_ids[3] not in (eos, stop)
    # Logprobs still describe the raw model distribution.
    assert out.logprobs[0] < math.log(1e-6)


def test_min_tokens_bans_hold_over_many_random_draws():
    logits = torch.zeros(2000, 4)
    logits[:, 3] = 5.0
    params = SamplingParams(temperature=1.5, min_tokens=1, stop_token_ids=[0])
    torch.manual_seed(0)
    out = Sampler()(logits, [row(params, eos={3}) for _ in range(2000)])
    assert set(out.token_ids) == {1, 2}


# ---------------------------------------------------------------- logit_bias


def test_logit_bias_adds_to_each_rows_own_tokens_and_skips_ids_past_the_vocab():
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(5))
    biases = [{2: 5.0, 7: -100.0, 10**6: 3.0}, {}, {0: 0.5}]
    rows = [row(SamplingParams(logit_bias=b)) for b in biases]
    expected = logits.clone()
    for i, bias in enumerate(biases):  # the direct computation
        for token_id, value in bias.items():
            if token_id < 10:
                expected[i, token_id] += value
    assert torch.equal(apply_logit_bias(logits, rows), expected)


def test_logit_bias_steers_greedy_and_random_rows_but_not_logprobs():
    logits = torch.zeros(2000, 6)
    logits[:, 0] = 10.0
    raw = torch.log_softmax(logits[0], dim=-1)
    greedy = SamplingParams(temperature=0.0, logit_bias={4: 50.0}, logprobs=0)
    banned = SamplingParams(temperature=1.0, logit_bias={0: -100.0, 1: -100.0})
    torch.manual_seed(0)
    out = Sampler()(logits, [row(greedy)] + [row(banned) for _ in range(1999)])
    assert out.token_ids[0] == 4
    assert out.logprobs[0] == pytest.approx(raw[4].item())  # logprobs describe the model (vLLM v1)
    assert set(out.token_ids[1:]) == {2, 3, 4, 5}
    counts = Counter(out.token_ids[1:])
    assert chi_square(counts, {t: 0.25 for t in (2, 3, 4, 5)}) < 20  # uniform over the unbanned four


# ---------------------------------------------------------------- mixed batch and errors


def test_mixed_batch_rows_behave_as_each_alone():
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(4, 100, generator=gen)
    greedy = SamplingParams(temperature=0.0, presence_penalty=0.5)
    seeded = SamplingParams(temperature=0.9, top_p=0.8, seed=7)
    top_k = SamplingParams(temperature=1.0, top_k=3)
    unseeded = SamplingParams(temperature=1.0, min_p=0.3)

    def make_rows():
        return [row(greedy, output=[4, 4]), row(seeded, seed=7), row(top_k, seed=8), row(unseeded)]

    batch = Sampler()(logits, make_rows())
    alone = [Sampler()(logits[i:i + 1], [r]) for i, r in enumerate(make_rows())]
    for i in range(3):  # greedy and seeded rows are deterministic
        assert batch.token_ids[i] == alone[i].token_ids[0]
        assert batch.logprobs[i] == pytest.approx(alone[i].logprobs[0])
    assert batch.token_ids[2] in logits[2].topk(3).indices.tolist()
    probs = logits[3].softmax(-1)
    assert probs[batch.token_ids[3]] >= 0.3 * probs.max()


def test_empty_batch_and_bad_inputs():
    assert Sampler()(torch.empty(0, 10), []).token_ids == []
    with pytest.raises(ValueError, match="rows"):
        Sampler()(torch.randn(2, 10), [row(SamplingParams())])
    with pytest.raises(ValueError, match="vocab_size"):
        Sampler()(torch.randn(10), [])
    with pytest.raises(ValueError, match="outside"):
        Sampler()(torch.randn(1, 10), [row(SamplingParams(frequency_penalty=1.0), output=[10])])
