"""Compare a splitserve answer with vLLM's recorded answer to the same request.

What must agree:
- the status code, and JSON vs SSE;
- every field vLLM sends with a value, with the same value: texts, token ids, finish and stop
  reasons, usage, logprobs (within LOGPROB_TOLERANCE), /tokenize's tokens ...; no field that
  vLLM does not send (null fields count as not sent: vLLM sends many null extension fields);
- streams: the same events once merged per choice (text, logprobs and finish reason of each
  choice, usage), chat's first chunk of each choice exactly {"role": "assistant", "content": ""},
  the same keys on every chunk of a kind, and "[DONE]" last. How tokens split into chunks may
  differ (a busy gateway merges tokens; vLLM does too).
Values that cannot agree are normalised: ids (their prefix must agree; with X-Request-Id the
whole id), timestamps, error messages (a non-empty string). Everything else that differs must be
listed in DIFFERENCES, with the reason.
"""

from __future__ import annotations

import fnmatch
import math
import re
from typing import Any

LOGPROB_TOLERANCE = 1e-3

DIFFERENCES: list[tuple[str, str, str]] = [
    # (case name pattern, field path pattern, reason)
    ("*", "system_fingerprint", "vLLM names its build there; OpenAI's field is optional and splitserve leaves it out"),
    ("*", "error.type", "OpenAI's string error types (invalid_request_error ...) where vLLM sends exception names"),
    ("*", "error.code", "OpenAI's string error codes (or null) where vLLM repeats the HTTP status as a number"),
    ("*", "error.param", "which parameter an error names is worded differently (vLLM often sends null)"),
    ("*", "detail", "404/405 bodies: splitserve answers every error in OpenAI's error format, not FastAPI's {detail}"),
    ("err_unknown_path", "error", "404/405 bodies: OpenAI's error format instead of FastAPI's {detail}"),
    ("err_wrong_method", "error", "404/405 bodies: OpenAI's error format instead of FastAPI's {detail}"),
    ("models", "data.*.owned_by", "the owner is splitserve"),
    ("model_by_*id", "*", "splitserve serves OpenAI's GET /v1/models/{model} (client.models.retrieve): the card, "
                          "or OpenAI's model_not_found; vLLM 0.32 has no such route and answers 404 {detail}"),
    ("cmpl_best_of_stream", "*", "best_of > n with stream is refused, as OpenAI does (the best choices are known only "
                                 "at the end); vLLM 0.32 ignores best_of altogether"),
    ("cmpl_best_of_n2", "usage.*", "best_of > n runs best_of candidates and counts all their tokens (as OpenAI bills "
                                   "them); vLLM 0.32 ignores best_of and runs n"),
    ("*_unknown_field", "*", "an unknown field is a 400 naming it (splitserve's rule: no field is silently "
                             "ignored); vLLM ignores it with a warning in its log"),
    ("cmpl_seed", "choices.*.text", "seeded sampling draws from splitserve's own generator: the same seed gives "
                                    "the same text on splitserve (whatever the batch), not vLLM's text"),
    ("health", "*", "/health answers JSON with each worker's state (vLLM: an empty 200)"),
    ("version", "version", "splitserve's own version"),
    ("cmpl_echo*stream", "choices.*.prompt_token_ids", "vLLM adds the prompt's token ids to the first chunk of an "
                                                       "echoed stream, a field OpenAI does not have"),
    ("cmpl_echo_max_tokens_0", "usage.*", "echo with max_tokens 0 returns no completion token, and splitserve "
                                          "counts none; vLLM 0.32 counts the one it computed and dropped"),
    ("*", "*usage.prompt_tokens_details", "OpenAI's usage.prompt_tokens_details.cached_tokens (issue 11) is always "
                                          "sent, as OpenAI does; vLLM sends it only with --enable-prompt-tokens-details"),
    ("err_detokenize_outside_vocab", "*", "vLLM decodes an id outside the vocabulary to an empty string; splitserve "
                                          "answers 400 naming the id"),
]


def documented(case: str, path: str) -> str | None:
    """The reason `path` of `case` may differ, or None."""
    for case_pattern, path_pattern, reason in DIFFERENCES:
        if fnmatch.fnmatchcase(case, case_pattern) and (fnmatch.fnmatchcase(path, path_pattern)
                                                        or path.startswith(path_pattern + ".")):
            return reason
    return None


def strip_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: strip_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [strip_nulls(v) for v in value]
    return value


def diff(case: str, expected: Any, actual: Any, path: str = "") -> list[str]:
    """Undocumented differences between vLLM's `expected` and splitserve's `actual` (nulls stripped)."""
    if documented(case, path) is not None:
        return []
    rule = _normalised_rule(case, path)
    if rule is not None:
        return [] if rule(expected, actual) else [f"{path}: vLLM {expected!r}, splitserve {actual!r}"]
    if isinstance(expected, dict) and isinstance(actual, dict):
        problems = []
        for key in sorted(set(expected) | set(actual)):
            sub = f"{path}.{key}" if path else str(key)
            if key not in actual:
                if documented(case, sub) is None:
                    problems.append(f"{sub}: missing (vLLM sends {_short(expected[key])})")
            elif key not in expected:
                if documented(case, sub) is None:
                    problems.append(f"{sub}: extra field {_short(actual[key])} (vLLM does not send it)")
            else:
                problems += diff(case, expected[key], actual[key], sub)
        return problems
    if isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual):
            return [f"{path}: {len(expected)} items in vLLM's, {len(actual)} in splitserve's "
                    f"({_short(expected)} vs {_short(actual)})"]
        return [p for i, (e, a) in enumerate(zip(expected, actual)) for p in diff(case, e, a, f"{path}.{i}")]
    if isinstance(expected, float) and isinstance(actual, (int, float)) and not isinstance(actual, bool):
        close = math.isclose(expected, actual, rel_tol=LOGPROB_TOLERANCE, abs_tol=LOGPROB_TOLERANCE)
        return [] if close else [f"{path}: vLLM {expected!r}, splitserve {actual!r}"]
    if type(expected) is not type(actual) or expected != actual:
        return [f"{path}: vLLM {_short(expected)}, splitserve {_short(actual)}"]
    return []


def _normalised_rule(case: str, path: str):
    last = path.rsplit(".", 1)[-1]
    if last == "id" and "." not in path:
        return _same_id
    if last == "created" or (path.startswith("data.") and path.endswith("permission.0.id")):
        return lambda e, a: isinstance(a, int) if last == "created" else isinstance(a, str)
    if path == "error.message":
        return lambda e, a: isinstance(a, str) and bool(a)
    return None


_RANDOM_ID = re.compile(r"^((?:chat)?cmpl|modelperm)-[0-9a-f]{16,}$")


def _same_id(expected: str, actual: str) -> bool:
    """Random ids: the same prefix; ids from X-Request-Id: equal."""
    match = _RANDOM_ID.match(expected)
    if match is None:
        return expected == actual
    return isinstance(actual, str) and actual.startswith(match.group(1) + "-") and len(actual) > len(match.group(1)) + 8


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 160 else text[:157] + "..."


# ---- streams --------------------------------------------------------------------------------

def merge_stream(events: list) -> dict:
    """A stream's events folded into what a client reads: per choice, the text (or chat delta
    content), logprobs and finish fields; plus the usage chunk, the chunks' key sets by kind,
    and whether "[DONE]" came last."""
    choices: dict[int, dict] = {}
    shapes: dict[str, set] = {}
    usage = None
    for event in events[:-1]:
        if not isinstance(event, dict):
            return {"bad_event": event}
        event = strip_nulls(event)
        if "error" in event:
            return {"error_event": True}
        if not event.get("choices"):
            usage = event.get("usage")
            shapes.setdefault("usage", set()).add(_keys(event))
            continue
        for choice in event["choices"]:
            _fold_choice(choices.setdefault(choice["index"], {}), choice, shapes, event)
    return {"choices": choices, "usage": usage, "shapes": {k: sorted(v) for k, v in shapes.items()},
            "done_last": bool(events) and events[-1] == "[DONE]"}


def _fold_choice(merged: dict, choice: dict, shapes: dict, event: dict) -> None:
    delta = choice.get("delta")
    if delta is not None and "role" in delta:
        merged.setdefault("role_chunks", []).append(delta)
        shapes.setdefault("role", set()).add(_keys(event, choice))
        return
    kind = "final" if "finish_reason" in choice else "token"
    shapes.setdefault(kind, set()).add(_keys(event, choice))
    merged["text"] = merged.get("text", "") + (delta.get("content", "") if delta is not None else choice.get("text", ""))
    logprobs = choice.get("logprobs")
    if logprobs is not None:
        if "content" in logprobs:
            merged.setdefault("logprobs", []).extend(logprobs["content"])
        else:
            for key, values in logprobs.items():
                merged.setdefault("logprobs_" + key, []).extend(values)
    for key in ("finish_reason", "stop_reason", "prompt_logprobs"):
        if key in choice:
            merged[key] = choice[key]


def _keys(event: dict, choice: dict | None = None) -> str:
    keys = sorted(k for k in event if k not in ("choices", "system_fingerprint"))  # the latter: see DIFFERENCES
    if choice is not None:
        keys += sorted(f"choice.{k}" for k in choice)
        keys += sorted(f"delta.{k}" for k in choice.get("delta", {}))
    return ",".join(keys)
