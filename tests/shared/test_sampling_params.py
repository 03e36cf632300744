"""The one table of sampling fields: every range is enforced, and every value it lets through runs
in the real engine without an error (no overflow, no type mismatch, min_tokens with eos ids)."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest

from splitserve.shared.llm import LLM
from splitserve.shared.sampling_params import FIELD_TYPES, SamplingParams, sampling_fields


def _edges(name: str, spec) -> list[typing.Any]:
    """Values at the edges of a field's range (huge finite floats where it is open above)."""
    kind = FIELD_TYPES[name]
    origin = typing.get_origin(kind)
    if origin is list and spec.item_le is not None:
        return [[int(spec.item_ge)], [int(spec.item_le)]]
    if origin is dict:
        return [{int(spec.item_ge): spec.ge}, {int(spec.item_le): spec.le}]
    scalar = next((a for a in (kind, *typing.get_args(kind)) if a in (int, float)), None)
    if scalar is None:
        return []
    low = spec.ge if spec.ge is not None else (spec.gt + 1e-300 if scalar is float else spec.gt + 1)
    high = spec.le if spec.le is not None else 1e300
    return [scalar(low), scalar(high)]


EDGE_CASES = [(name, value) for name, spec in sampling_fields() if name != "n" for value in _edges(name, spec)]


@pytest.fixture(scope="module")
def llm(checkpoint_factory):
    return LLM(checkpoint_factory("llama"), device="cpu", num_blocks=64, block_size=4)


@pytest.mark.parametrize("name,value", EDGE_CASES, ids=[f"{n}={v!r:.20}" for n, v in EDGE_CASES])
def test_each_field_at_the_edge_of_its_range_runs_in_the_engine(llm, name, value):
    params = {"temperature": 0.7, "seed": 3, "max_tokens": 3, "logprobs": 2, name: value}
    if name == "min_tokens":
        params["max_tokens"] = None  # generates up to the context length
    out = llm.generate({"prompt_token_ids": [1, 2, 3, 4]}, SamplingParams(**params))[0].outputs[0]
    assert out.finish_reason in ("length", "stop") and out.token_ids


def test_min_tokens_with_the_models_eos_ids_runs_greedy_and_random(llm):
    """`min_tokens` >= 1 used to kill the engine: the eos ids arrive as a tuple."""
    for temperature in (0.0, 1.0):
        out = llm.generate({"prompt_token_ids": [1, 2, 3]},
                           SamplingParams(temperature=temperature, min_tokens=2, max_tokens=4))[0].outputs[0]
        assert len(out.token_ids) >= 2


def _bad_values(name: str, spec) -> list[typing.Any]:
    kind = FIELD_TYPES[name]
    origin = typing.get_origin(kind)
    if kind == list[str]:
        return [[1], [""], 5]
    if origin is list:
        return [["x"], [int(spec.item_ge) - 1], [int(spec.item_le) + 1], 5]
    if origin is dict:
        return [{int(spec.item_ge) - 1: 0.0}, {int(spec.item_le) + 1: 0.0}, {0: spec.le + 1}, {0: math.nan},
                {"a": 1.0}, [1]]
    if kind is bool:
        return [1, "yes", None]
    if any(dataclasses.is_dataclass(a) for a in typing.get_args(kind)):  # a structured value, not a dict of it
        return [{"regex": "a"}, "json", 5]
    below = [spec.ge - 1] if spec.ge is not None else [spec.gt]
    above = [spec.le + 1] if spec.le is not None else []
    return [math.inf, math.nan, "1", True, *below, *above]


@pytest.mark.parametrize("name,spec", sampling_fields(), ids=[n for n, _ in sampling_fields()])
def test_values_past_each_range_are_refused_naming_the_field(name, spec):
    for value in _bad_values(name, spec):
        with pytest.raises(ValueError, match=name):
            SamplingParams(**{name: value})
