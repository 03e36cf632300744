"""The structured-output spec of a request, shaped like vLLM's `StructuredOutputsParams`.

Plain data, torch-free (the gateway builds it): exactly one of `json` (a JSON schema, as a dict
or a JSON string), `regex`, `choice` (the output is one of these strings), `grammar` (EBNF as
xgrammar reads it), `json_object` (any JSON object) or `structural_tag` (free text with
constrained tool calls). The engine compiles it into a grammar (shared/grammar.py) and masks
every sampled token with it.

`param` is the gateway's note of the request field the spec came from, so that a 400 about it
names that field; it is not part of the spec (not compared, not sent to the workers).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")

INVALID = "invalid structured_outputs"
"""How every error message about a request's own spec begins (the gateway recognises them by it)."""


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
    param: str | None = field(default=None, compare=False)
    """The request field this came from (`response_format`, `structured_outputs`, `tools`): what
    a 400 about it names. The gateway's note, not part of the spec."""

    def __post_init__(self) -> None:
        if isinstance(self.choice, list):
            object.__setattr__(self, "choice", tuple(self.choice))
        self.validate()

    @property
    def kind(self) -> str:
        return next(name for name in KINDS if getattr(self, name) not in (None, False))

    def validate(self) -> None:
        """Raise ValueError naming the problem (shape only: compiling finds the rest)."""
        given = [name for name in KINDS if getattr(self, name) not in (None, False)]
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
        try:
            return json.dumps(json.loads(self.json) if isinstance(self.json, str) else self.json, sort_keys=True)
        except json.JSONDecodeError as exc:
            raise ValueError(f"structured_outputs.json is not valid JSON: {exc}") from None
        except RecursionError:  # Python's json recurses per level: about 1000 is as deep as it goes
            raise ValueError("structured_outputs.json nests too deeply to be read") from None


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
