"""The benchmark workload: what is asked (prompts and lengths) and when (arrival times).

Everything here is deterministic given a seed and needs no server and no tokenizer.

Prompts come in two forms:
- token ids (`list[int]`) for the completions endpoint, which accepts `prompt: list[int]`, so the
  input length the server sees is exact;
- text of space-separated common English words for the chat endpoint, about one token per word
  for BPE tokenizers (the server's `usage.prompt_tokens` gives the exact count afterwards).

Datasets:
- `random`: input and output lengths uniform in `[len * (1 - r), len * (1 + r)]` (r = range ratio).
- `sharegpt-synthetic`: lengths drawn from lognormal distributions shaped like the ShareGPT
  conversations serving benchmarks use (many short prompts, a long tail), with no download.
  See `SHAREGPT_SYNTHETIC` for the parameters.

Arrivals: gaps between requests are Gamma(shape=burstiness, scale=1 / (rate * burstiness)), so
the mean gap is 1 / rate whatever the burstiness; burstiness 1.0 is a Poisson process, lower is
burstier (larger variance), higher is more regular.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Ids below this are skipped when drawing random prompts: small ids are where many vocabularies
# (the demo checkpoint's included) keep special tokens such as BOS/EOS and role markers.
FIRST_RANDOM_TOKEN_ID = 64

# A few hundred frequent English words; each is one token in typical BPE vocabularies.
_WORDS = (
    "the of and to in is was for on are with as his they be at one have this from or had by hot "
    "word but what some we can out other were all there when up use your how said an each she "
    "which do their time if will way about many then them write would like so these her long make "
    "thing see him two has look more day could go come did number sound no most people my over "
    "know water than call first who may down side been now find any new work part take get place "
    "made live where after back little only round man year came show every good me give our under "
    "name very through just form sentence great think say help low line differ turn cause much "
    "mean before move right boy old too same tell does set three want air well also play small end "
    "put home read hand port large spell add even land here must big high such follow act why ask "
    "men change went light kind off need house picture try us again animal point mother world near "
    "build self earth father head stand own page should country found answer school grow study "
    "still learn plant cover food sun four between state keep eye never last let thought city tree "
    "cross farm hard start might story saw far sea draw left late run while press close night real "
    "life few north open seem together next white children begin got walk example ease paper group "
    "always music those both mark often letter until mile river car feet care second book carry "
    "took science eat room friend began idea fish mountain stop once base hear horse cut sure watch "
    "color face wood main enough plain girl usual young ready above ever red list though feel talk "
    "bird soon body dog family direct pose leave song measure door product black short numeral class"
).split()


@dataclass(frozen=True)
class ShareGptShape:
    """Lognormal length distributions; median = exp(mu), mean = exp(mu + sigma^2 / 2)."""

    input_median_tokens: float
    input_sigma: float
    output_median_tokens: float
    output_sigma: float
    min_len_tokens: int  # shorter prompts/outputs are redrawn (ShareGPT filters drop them too)
    max_prompt_tokens: int
    max_total_tokens: int  # prompt + output, as a model context limit would impose


# Not fitted to any file here (nothing is downloaded): chosen to match the commonly quoted shape of
# ShareGPT as filtered by serving benchmarks (prompts < 1024 tokens, prompt + output < 2048, both
# >= 4): prompt median ~130 (mean ~215), output median ~170 (mean ~255), heavy right tails.
SHAREGPT_SYNTHETIC = ShareGptShape(
    input_median_tokens=130.0,
    input_sigma=1.0,
    output_median_tokens=170.0,
    output_sigma=0.9,
    min_len_tokens=4,
    max_prompt_tokens=1023,
    max_total_tokens=2047,
)


@dataclass(frozen=True)
class SampleRequest:
    """One request of the workload."""

    prompt: str | list[int]
    prompt_len: int  # exact for token-id prompts, the word count for text prompts
    expected_output_len: int  # sent as max_tokens


def ranged_lengths(rng: np.random.Generator, mean_len: int, range_ratio: float, num: int) -> list[int]:
    """`num` integer lengths uniform in [mean_len * (1 - r), mean_len * (1 + r)], at least 1."""
    if mean_len < 1:
        raise ValueError(f"length must be >= 1, got {mean_len}")
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range ratio must be in [0, 1), got {range_ratio}")
    low = max(1, math.floor(mean_len * (1.0 - range_ratio)))
    high = max(low, math.ceil(mean_len * (1.0 + range_ratio)))
    return [int(x) for x in rng.integers(low, high + 1, size=num)]


def random_token_ids(rng: np.random.Generator, num_tokens: int, vocab_size: int) -> list[int]:
    """`num_tokens` ids uniform in [FIRST_RANDOM_TOKEN_ID, vocab_size)."""
    if vocab_size <= FIRST_RANDOM_TOKEN_ID:
        raise ValueError(f"vocab_size must exceed {FIRST_RANDOM_TOKEN_ID}, got {vocab_size}")
    return [int(x) for x in rng.integers(FIRST_RANDOM_TOKEN_ID, vocab_size, size=num_tokens)]


def random_words(rng: np.random.Generator, num_words: int) -> str:
    """`num_words` space-separated words from a fixed list (about one token each)."""
    picks = rng.integers(0, len(_WORDS), size=num_words)
    return " ".join(_WORDS[i] for i in picks)


def _make_prompt(rng: np.random.Generator, num_tokens: int, as_token_ids: bool, vocab_size: int) -> str | list[int]:
    if as_token_ids:
        return random_token_ids(rng, num_tokens, vocab_size)
    return random_words(rng, num_tokens)


def _streams(seed: int, num: int) -> list[np.random.Generator]:
    """Independent generators for lengths and prompt contents, so the first k requests of a
    workload of n are the same as a workload of k (growing --num-prompts extends, not reshuffles)."""
    return [np.random.default_rng([seed, stream]) for stream in range(num)]


def random_requests(
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float = 0.0,
    *,
    as_token_ids: bool = True,
    vocab_size: int = 4096,
    seed: int = 0,
) -> list[SampleRequest]:
    """The `random` dataset: ranged uniform lengths, random token-id or word prompts."""
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
    input_rng, output_rng, prompt_rng = _streams(seed, 3)
    input_lens = ranged_lengths(input_rng, input_len, range_ratio, num_prompts)
    output_lens = ranged_lengths(output_rng, output_len, range_ratio, num_prompts)
    return [
        SampleRequest(_make_prompt(prompt_rng, n_in, as_token_ids, vocab_size), n_in, n_out)
        for n_in, n_out in zip(input_lens, output_lens)
    ]


def sharegpt_synthetic_lengths(
    rng: np.random.Generator, num: int, shape: ShareGptShape = SHAREGPT_SYNTHETIC
) -> list[tuple[int, int]]:
    """`num` (prompt_len, output_len) pairs from the lognormal shape, redrawing out-of-range pairs."""
    pairs: list[tuple[int, int]] = []
    while len(pairs) < num:
        n_in = int(round(rng.lognormal(math.log(shape.input_median_tokens), shape.input_sigma)))
        n_out = int(round(rng.lognormal(math.log(shape.output_median_tokens), shape.output_sigma)))
        if min(n_in, n_out) < shape.min_len_tokens or n_in > shape.max_prompt_tokens:
            continue
        if n_in + n_out > shape.max_total_tokens:
            continue
        pairs.append((n_in, n_out))
    return pairs


def sharegpt_synthetic_requests(
    num_prompts: int,
    *,
    as_token_ids: bool = True,
    vocab_size: int = 4096,
    seed: int = 0,
    shape: ShareGptShape = SHAREGPT_SYNTHETIC,
) -> list[SampleRequest]:
    """The `sharegpt-synthetic` dataset: ShareGPT-like lengths, random prompts of those lengths."""
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
    length_rng, prompt_rng = _streams(seed, 2)
    return [
        SampleRequest(_make_prompt(prompt_rng, n_in, as_token_ids, vocab_size), n_in, n_out)
        for n_in, n_out in sharegpt_synthetic_lengths(length_rng, num_prompts, shape)
    ]


def arrival_gaps_s(num_requests: int, request_rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Seconds to wait before sending each request (the first gap included).

    Gamma(shape=burstiness, scale=1 / (rate * burstiness)): mean 1 / rate, variance
    1 / (rate^2 * burstiness). An infinite rate sends everything at once (all gaps 0).
    """
    if request_rate <= 0:
        raise ValueError(f"request rate must be > 0 (or inf), got {request_rate}")
    if burstiness <= 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = np.random.default_rng(seed)
    scale_s = 1.0 / (request_rate * burstiness)
    return [float(x) for x in rng.gamma(shape=burstiness, scale=scale_s, size=num_requests)]
