"""Per-request sampling parameters, named and defaulted as in vLLM's `SamplingParams`.

This dataclass is the ONE definition of each sampling field. Each field's metadata (`param(...)`)
holds its range and where it goes, and everything else derives from it:

    SamplingParams.validate()            the ranges below, for every caller (offline API, workers)
    gateway request models               one OpenAI/vLLM request field per `openai=True` field, same
                                         name, same range, null = this default (openai_protocol.py)
    protobuf <-> dataclass               every `wire=True` field, by name (shared/protocol/convert.py)

Adding a field: declare it here (and, if `wire`, the same name in worker.proto's SamplingParams);
then use it where it takes effect (the sampler, the detokenizer).

Every integer has a closed range that fits the type it is sent as (int32 in the proto, int64 for
the seed), so no value can overflow a C type on its way to the engine; every float must be finite.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import MISSING, dataclass, field, fields, replace

from splitserve.shared.structured_outputs import StructuredOutputsParams

INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0


@dataclass(frozen=True)
class FieldSpec:
    """What a sampling field accepts and where it travels."""

    doc: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    item_ge: float | None = None
    """Lists: each item's range; dicts: each key's (dict values use ge/le)."""
    item_le: float | None = None
    wire: bool = True
    """Sent to the workers (the gateway handles the others itself)."""
    openai: bool = True
    """Accepted under its own name in both OpenAI endpoints (False: an endpoint maps it itself)."""
    openai_type: typing.Any = None
    """The request's JSON type where it differs from the field's (`stop` also takes one string)."""


def param(doc: str, default: typing.Any = MISSING, *, default_factory: typing.Any = MISSING, **spec) -> typing.Any:
    return field(default=default, default_factory=default_factory, metadata={"spec": FieldSpec(doc, **spec)})


@dataclass
class SamplingParams:
    n: int = param("Number of completions to return for the prompt.", 1, ge=1, le=INT32_MAX, wire=False)
    temperature: float = param("0 means greedy.", 1.0, ge=0.0)
    top_p: float = param("Nucleus sampling: the smallest set of tokens whose probability reaches top_p.", 1.0,
                         gt=0.0, le=1.0)
    top_k: int = param("Keep the k most likely tokens; 0 or -1 disables.", 0, ge=-1, le=INT32_MAX)
    min_p: float = param("Drop tokens whose probability is below min_p times the top token's.", 0.0, ge=0.0, le=1.0)
    seed: int | None = param("Per-request seed: the same seed and prompt give the same tokens, whatever the batch.",
                             None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: float = param("OpenAI definition: subtract once from every token in the output so far.", 0.0,
                                    ge=-2.0, le=2.0)
    frequency_penalty: float = param("OpenAI definition: subtract count-times from every token in the output so far.",
                                     0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = param("HF/CTRL definition over prompt and output tokens: positive logits divided, "
                                      "negative multiplied.", 1.0, gt=0.0)
    max_tokens: int | None = param("Tokens to generate at most; None: up to the model's context length.", 16,
                                   ge=1, le=INT32_MAX)
    min_tokens: int = param("Tokens to generate before eos or stop_token_ids may end the output.", 0,
                            ge=0, le=INT32_MAX)
    stop: list[str] = param("Stop strings, matched on detokenized text; left out of the output unless "
                            "include_stop_str_in_output.", default_factory=list, wire=False,
                            openai_type=str | list[str] | None)
    include_stop_str_in_output: bool = param("Keep the stop string that ended the output at its end (vLLM's).", False,
                                             wire=False)
    stop_token_ids: list[int] = param("Token ids that end the output (the id is returned as stop_reason).",
                                      default_factory=list, item_ge=0, item_le=INT32_MAX)
    ignore_eos: bool = param("Keep generating past the model's end-of-sequence tokens.", False)
    logprobs: int | None = param("Return the sampled token's logprob plus this many top alternatives "
                                 "(0: the sampled one only).", None, ge=0, le=MAX_LOGPROBS, openai=False)
    logit_bias: dict[int, float] = param("Added to the logits of these token ids before penalties, temperature and "
                                         "filters (OpenAI's range: -100 bans, 100 forces).", default_factory=dict,
                                         ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS, item_ge=0, item_le=INT32_MAX)
    prompt_logprobs: int | None = param("Return each prompt token's logprob (from the second on) plus this many top "
                                        "alternatives, as vLLM does; such a request reads nothing from the prefix "
                                        "cache, so every position is computed.", None, ge=0, le=MAX_LOGPROBS,
                                        openai=False)
    skip_special_tokens: bool = param("Leave special tokens out of the returned text.", True, wire=False)
    structured_outputs: StructuredOutputsParams | None = param(
        "Constrain the output to a JSON schema, regex, choice list or grammar (shared/grammar.py).", None,
        openai=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    @property
    def penalised(self) -> bool:
        """Repetition, frequency or presence penalties: sampling reads the previous tokens."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def for_choice(self, k: int) -> SamplingParams:
        """The k-th of n samples, n = 1: its own seed (seed + k, wrapped into int64) so that the n
        samples differ and each reproduces, as vLLM does. Used by the offline API and the gateway."""
        if self.seed is None:
            return replace(self, n=1)
        return replace(self, n=1, seed=(self.seed + k - INT64_MIN) % 2**64 + INT64_MIN)

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        for name, spec in _sampling_fields(()):  # cached: several SamplingParams are built per request
            _check_field(name, getattr(self, name), spec, FIELD_TYPES[name])
        if self.n > 1 and self.greedy:
            raise ValueError(f"n must be 1 when using greedy sampling, got {self.n} (as in vLLM)")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if not all(self.stop):
            raise ValueError("stop must be a list of non-empty strings")


def spec_of(f) -> FieldSpec:
    return f.metadata["spec"]


def sampling_fields(**where: bool) -> list[tuple[str, FieldSpec]]:
    """(name, spec) of each field, in declaration order; `wire=True` etc. keeps those that match."""
    return list(_sampling_fields(tuple(sorted(where.items()))))


@functools.lru_cache(maxsize=None)
def _sampling_fields(where: tuple[tuple[str, bool], ...]) -> tuple[tuple[str, FieldSpec], ...]:
    # Once per filter: the conversions to and from protobuf ask for every request.
    return tuple((f.name, spec_of(f)) for f in fields(SamplingParams)
                 if all(getattr(spec_of(f), key) == value for key, value in where))


FIELD_TYPES: dict[str, typing.Any] = typing.get_type_hints(SamplingParams)


# ---- checks -----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _type_parts(annotation: typing.Any) -> tuple[typing.Any, tuple, typing.Any]:
    """(origin, args, the scalar type of an optional) of an annotation: taken apart once, since
    reading annotations on every check cost more than the rest of it."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    return origin, args, next((a for a in args if a is not type(None)), annotation)


def _check_field(name: str, value: typing.Any, spec: FieldSpec, annotation: typing.Any) -> None:
    origin, args, scalar = _type_parts(annotation)
    if value is None:
        if type(None) not in args:
            raise ValueError(f"{name} must not be None")
        return
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list, got {type(value).__name__}")
        for item in value:
            _check_scalar(f"{name} items", item, args[0], spec.item_ge, None, spec.item_le)
    elif origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a mapping, got {type(value).__name__}")
        for key, item in value.items():
            _check_scalar(f"{name} keys", key, args[0], spec.item_ge, None, spec.item_le)
            _check_scalar(f"{name} values", item, args[1], spec.ge, spec.gt, spec.le)
    else:
        _check_scalar(name, value, scalar, spec.ge, spec.gt, spec.le)


def _check_scalar(name: str, value: typing.Any, kind: type, ge: float | None, gt: float | None,
                  le: float | None) -> None:
    if _is_dataclass(kind):  # a structured value checks itself on construction
        if not isinstance(value, kind):
            raise ValueError(f"{name} must be a {kind.__name__}, got {type(value).__name__}")
        return
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be a boolean, got {value!r}")
        return
    if kind is str:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be strings, got {value!r}")
        return
    numeric = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, numeric):
        raise ValueError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if (ge is not None and value < ge) or (gt is not None and value <= gt) or (le is not None and value > le):
        raise ValueError(f"{name} must be {_range_text(ge, gt, le)}, got {value}")


@functools.lru_cache(maxsize=None)
def _is_dataclass(kind: typing.Any) -> bool:
    return dataclasses.is_dataclass(kind)


def _range_text(ge: float | None, gt: float | None, le: float | None) -> str:
    low = f"[{ge}" if ge is not None else (f"({gt}" if gt is not None else "(-inf")
    high = f"{le}]" if le is not None else "inf)"
    return f"in {low}, {high}"
