"""OpenAI's `response_format` and vLLM's `structured_outputs` -> one `StructuredOutputsParams`.

    response_format {"type": "text"}                          unconstrained
    response_format {"type": "json_object"}                   StructuredOutputsParams(json_object=True)
    response_format {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}
                                                              StructuredOutputsParams(json=schema)
    structured_outputs {"json" | "regex" | "choice" | "grammar" | "json_object" | "structural_tag": ...}  as given

Only the shape is checked here (the gateway imports no torch, and xgrammar does): whether a
schema, regex or grammar compiles is found by the worker, whose INVALID_ARGUMENT becomes a 400
naming the field the spec came from (`spec_error`, applied by dispatch.py). The output is always held to the schema, so `strict: false` gets the same strict enforcement.
What the gateway can measure without compiling, a spec's size and nesting depth (`spec_size_bytes`,
`spec_depth`), it bounds (prepare.py, RequestLimits): the compile time of a schema grows with the
cube of its depth, and a compile cannot be stopped once begun.
"""

from __future__ import annotations

import json

import grpc

from splitserve.services.gateway.openai_protocol import APIError, bad_request
from splitserve.services.gateway.request_models import GenerationFields
from splitserve.services.gateway.worker_client import WorkerError
from splitserve.shared.structured_outputs import INVALID, StructuredOutputsParams


def structured_outputs_spec(body: GenerationFields) -> StructuredOutputsParams | None:
    fmt, fields = body.response_format, body.structured_outputs
    constrained_format = fmt is not None and fmt.type != "text"
    if constrained_format and fields is not None:
        raise bad_request("give either response_format or structured_outputs, not both", "structured_outputs")
    if constrained_format:
        return _from_response_format(fmt)
    if fields is None:
        return None
    try:
        return StructuredOutputsParams(json=fields.json_, regex=fields.regex, choice=fields.choice,
                                       grammar=fields.grammar, json_object=fields.json_object,
                                       structural_tag=fields.structural_tag, param="structured_outputs")
    except ValueError as exc:
        raise bad_request(str(exc), "structured_outputs") from None


def _from_response_format(fmt) -> StructuredOutputsParams:
    if fmt.type == "json_object":
        if fmt.json_schema is not None:
            raise bad_request("response_format.json_schema is only allowed with type json_schema",
                              "response_format.json_schema")
        return StructuredOutputsParams(json_object=True, param="response_format")
    if fmt.json_schema is None:
        raise bad_request("response_format.json_schema is required when type is json_schema",
                          "response_format.json_schema")
    return StructuredOutputsParams(json=fmt.json_schema.schema_, param="response_format")


def spec_error(exc: WorkerError, spec: StructuredOutputsParams | None) -> APIError | None:
    """A worker's verdict on the request's own spec (it does not compile, or not within the
    compile timeout) as a 400 naming the field the spec came from; None for any other failure."""
    if spec is None or exc.code != grpc.StatusCode.INVALID_ARGUMENT or not exc.details.startswith(INVALID):
        return None
    return bad_request(exc.details, spec.param or "structured_outputs")


def spec_size_bytes(spec: StructuredOutputsParams) -> int:
    """UTF-8 bytes of what the workers compile: the schema's canonical text, the regex, grammar
    or structural tag, or the choices together."""
    kind = spec.kind
    if kind == "json_object":
        return 0
    if kind == "choice":
        return sum(len(c.encode()) for c in spec.choice)
    return len((spec.json_text() if kind == "json" else getattr(spec, kind)).encode())


def spec_depth(spec: StructuredOutputsParams) -> int:
    """Nesting depth of a JSON schema or structural tag, in JSON containers (`{"type": "integer"}`
    is 1); 0 for the other kinds (xgrammar bounds the nesting of regexes and grammars itself).
    A structural tag that is no JSON is the worker's to refuse; one too deep for Python's parser
    raises ValueError, as such a JSON schema does (StructuredOutputsParams.json_text)."""
    kind = spec.kind
    if kind not in ("json", "structural_tag"):
        return 0
    try:
        value = spec.json if kind == "json" and not isinstance(spec.json, str) else json.loads(getattr(spec, kind))
    except json.JSONDecodeError:
        return 0
    except RecursionError:
        raise ValueError(f"structured_outputs.{kind} nests too deeply to be read") from None
    return json_depth(value)


def json_depth(value) -> int:
    """Containers nested in `value` (a parsed JSON document), counted without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest
