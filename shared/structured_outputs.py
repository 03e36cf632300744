"""The structured-output spec of a request, shaped like vLLM's `StructuredOutputsParams`.

Plain data, torch-free (the gateway builds it): exactly one of `json` (a JSON schema, as a dict
or a JSON string), `regex`, `choice` (the output is one of these strings), `grammar` (EBNF as
xgrammar reads it), `json_object` (any JSON object) or `structural_tag` (free text with
constrained tool calls). The engine compiles it into a grammar (shared/grammar.py) and masks
every sampled token with it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass(frozen=True)
class StructuredOutputsParams:
    json: dict[str, Any] | str | None = None
    """A JSON schema the output must validate against."""
    regex: str | None = None
    """A regular expression the whole output must match."""
    choice: tuple[str, ...] | None = None
    """The output is exactly one of these strings."""
    grammar: str | None = None
    """An EBNF grammar (xgrammar's dialect, GBNF-like: `root ::= ...`)."""
    json_object: bool | None = None
    """True: the output is some JSON object (OpenAI's `response_format: json_object`)."""
    structural_tag: str | None = None
    """xgrammar's structural tag, as JSON text: text is free until a trigger, and each tag that
    begins there is held to its content's schema (the gateway builds it for strict tool calls)."""

    def __post_init__(self) -> None:
        if isinstance(self.choice, list):
            object.__setattr__(self, "choice", tuple(self.choice))
        self.validate()

    @property
    def kind(self) -> str:
        return next(f.name for f in fields(self) if getattr(self, f.name) not in (None, False))

    def validate(self) -> None:
        """Raise ValueError naming the problem (shape only: compiling finds the rest)."""
        given = [f.name for f in fields(self) if getattr(self, f.name) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured_outputs must set exactly one of {', '.join(KINDS)}; got "
                             f"{', '.join(given) or 'none'}")
        _check_types(self)

    def key(self) -> tuple[str, str]:
        """(kind, canonical text): equal for specs that compile to the same grammar."""
        kind = self.kind
        if kind == "json":
            return kind, self.json_text()
        if kind == "choice":
            return kind, json.dumps(list(self.choice))
        if kind == "json_object":
            return kind, ""
        return kind, getattr(self, kind)

    def json_text(self) -> str:
        """The schema as canonical JSON text (raises ValueError if a string holds no JSON)."""
        if isinstance(self.json, str):
            try:
                return json.dumps(json.loads(self.json), sort_keys=True)
            except json.JSONDecodeError as exc:
                raise ValueError(f"structured_outputs.json is not valid JSON: {exc}") from None
        return json.dumps(self.json, sort_keys=True)


def _check_types(spec: StructuredOutputsParams) -> None:
    if spec.json is not None and not isinstance(spec.json, (dict, str)):
        raise ValueError("structured_outputs.json must be a JSON schema (an object or its JSON text)")
    if spec.json is not None:
        spec.json_text()
    for name in ("regex", "grammar", "structural_tag"):
        value = getattr(spec, name)
        if value is not None and (not isinstance(value, str) or not value):
            raise ValueError(f"structured_outputs.{name} must be a non-empty string")
    if spec.choice is not None and (not spec.choice or not all(isinstance(c, str) and c for c in spec.choice)):
        raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings")
    if spec.json_object is not None and spec.json_object is not True:
        raise ValueError("structured_outputs.json_object must be true when given")
