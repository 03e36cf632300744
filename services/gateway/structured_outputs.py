"""OpenAI's `response_format` and vLLM's `structured_outputs` -> one `StructuredOutputsParams`.

    response_format {"type": "text"}                          unconstrained
    response_format {"type": "json_object"}                   StructuredOutputsParams(json_object=True)
    response_format {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}
                                                              StructuredOutputsParams(json=schema)
    structured_outputs {"json" | "regex" | "choice" | "grammar" | "json_object" | "structural_tag": ...}  as given

Only the shape is checked here (the gateway imports no torch, and xgrammar does): whether a
schema, regex or grammar compiles is found by the worker, whose INVALID_ARGUMENT becomes a 400.
The output is always held to the schema, so `strict: false` gets the same strict enforcement.
"""

from __future__ import annotations

from splitserve.services.gateway.openai_protocol import bad_request
from splitserve.services.gateway.request_models import GenerationFields
from splitserve.shared.structured_outputs import StructuredOutputsParams


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
                                       structural_tag=fields.structural_tag)
    except ValueError as exc:
        raise bad_request(str(exc), "structured_outputs") from None


def _from_response_format(fmt) -> StructuredOutputsParams:
    if fmt.type == "json_object":
        if fmt.json_schema is not None:
            raise bad_request("response_format.json_schema is only allowed with type json_schema",
                              "response_format.json_schema")
        return StructuredOutputsParams(json_object=True)
    if fmt.json_schema is None:
        raise bad_request("response_format.json_schema is required when type is json_schema",
                          "response_format.json_schema")
    return StructuredOutputsParams(json=fmt.json_schema.schema_)
