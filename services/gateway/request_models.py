"""The OpenAI request bodies the gateway accepts, field by field.

Every accepted field is declared here; any other field is refused with a 400 that names it
(`extra="forbid"`, mapped in openai_protocol.validation_error). The sampling fields are not
written out: `SamplingFields` is generated from `SamplingParams`' table (shared/sampling_params.py),
with the same names and ranges, null meaning "the dataclass default". What is declared by hand
is what belongs to one endpoint (prompt, messages, the chat form of logprobs) or to the request
rather than the sampling (model, stream, priority, user).

OpenAI fields this server does not implement are declared too, so that a client sending their
"off" value (`suffix: null`, `tools: null`) is served, and any other value is refused by name
(`unsupported_field`).
"""

from __future__ import annotations

import json
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model, field_validator, model_validator
from pydantic_core import PydanticCustomError

from splitserve.shared.sampling_params import FIELD_TYPES, INT32_MAX, MAX_LOGPROBS, FieldSpec, sampling_fields


def _a_number(value: Any) -> Any:
    """JSON's true/false is no number and a string is no number: refused, where pydantic's lax
    mode would run `max_tokens: true` as 1 and `n: "2"` as 2 (an integral 2.0 is still 2)."""
    if isinstance(value, bool | str):
        raise PydanticCustomError("number_type", "Input should be a number, not {value}", {"value": json.dumps(value)})
    return value


def _a_boolean(value: Any) -> Any:
    """Only true or false: pydantic's lax mode would take "yes", "on" and 1 for true."""
    if not isinstance(value, bool):
        raise PydanticCustomError("bool_type", "Input should be true or false, not {value}", {"value": json.dumps(value)})
    return value


Int = Annotated[int, BeforeValidator(_a_number)]
Float = Annotated[float, BeforeValidator(_a_number)]
Flag = Annotated[bool, BeforeValidator(_a_boolean)]
_EXACT = {int: Int, float: Float, bool: Flag}
"""The request's scalar types: no coercion across JSON's kinds (the sampling fields get them too)."""
Int32 = Annotated[Int, Field(ge=-INT32_MAX - 1, le=INT32_MAX)]
MAX_PROMPT_CACHE_KEY_CHARS = 256
RETENTION_S = {"in_memory": 600.0, "24h": 86400.0}
"""`prompt_cache_retention` -> seconds a keyed session's blocks are retained after its latest turn
(OpenAI: in-memory retention lasts minutes of inactivity; extended retention up to 24 h)."""


class OpenAIModel(BaseModel):
    """Unknown fields are errors; floats must be finite."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def check_unicode(value: Any, path: str) -> None:
    """JSON may carry lone surrogates (\\ud800), which no tokenizer or UTF-8 response can hold."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise PydanticCustomError("invalid_unicode", "{path} is not valid Unicode (it holds a lone surrogate)",
                                      {"path": path or "the request"}) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            check_unicode(key, path)
            check_unicode(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        # Token ids (a prompt's thousands of them) hold no text. A list that starts with one and
        # hides a string later is not a valid token list, refused by its model anyway.
        if value and type(value[0]) is int:
            return
        for i, item in enumerate(value):
            check_unicode(item, f"{path}[{i}]")


def _constrained(name: str, spec: FieldSpec) -> Any:
    """The request's type for a sampling field: its dataclass type with the table's range."""
    if spec.openai_type is not None:
        return spec.openai_type
    kind = FIELD_TYPES[name]
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    items = Field(ge=spec.item_ge, le=spec.item_le)
    if origin is list:
        return list[Annotated[_EXACT.get(args[0], args[0]), items]] | None
    if origin is dict:  # keys stay lax: JSON object keys are strings ("50256")
        return dict[Annotated[args[0], items], Annotated[_EXACT.get(args[1], args[1]), Field(ge=spec.ge, le=spec.le)]] | None
    scalar = next((a for a in args if a is not type(None)), kind)
    return Annotated[_EXACT.get(scalar, scalar), Field(ge=spec.ge, gt=spec.gt, le=spec.le)] | None


SamplingFields = create_model(
    "SamplingFields", __base__=OpenAIModel,
    **{name: (_constrained(name, spec), Field(None, description=spec.doc)) for name, spec in sampling_fields(openai=True)})


class StreamOptions(OpenAIModel):
    include_usage: Flag = False
    continuous_usage_stats: Flag = False
    """vLLM's: every chunk carries its choice's usage so far."""


class JsonSchemaFormat(OpenAIModel):
    """OpenAI's `response_format.json_schema`."""

    model_config = ConfigDict(populate_by_name=True)
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: Flag | None = None


class ResponseFormat(OpenAIModel):
    """OpenAI's `response_format`: text (unconstrained), json_object or json_schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsField(OpenAIModel):
    """vLLM's `structured_outputs` request field, exactly one of these (structured_outputs.py);
    its other keys (whitespace_pattern, ...) are refused by name."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: Flag | None = None
    structural_tag: str | None = None
    """xgrammar's structural tag as JSON text (vLLM's field)."""


class GenerationFields(SamplingFields):
    """Fields shared by /v1/completions and /v1/chat/completions besides the sampling ones; every
    string in the request (keys included) must be valid Unicode."""

    model: str | None = Field(None, description="None: the served model (vLLM).")
    stream: Flag = False
    stream_options: StreamOptions | None = None
    priority: Int32 = Field(0, description="vLLM's: lower runs first under the priority scheduling policy.")
    user: str | None = Field(None, description="Accepted and ignored, as OpenAI and vLLM do.")
    prompt_cache_key: str | None = Field(None, min_length=1, max_length=MAX_PROMPT_CACHE_KEY_CHARS, description=(
        "OpenAI's: a conversation or agent id; its latest turn's KV is retained ahead of anonymous prefixes "
        "and its next turn is routed to the instance holding it."))
    prompt_cache_retention: Literal["in_memory", "24h"] | None = Field(None, description=(
        "OpenAI's: how long a keyed session's blocks are retained (in_memory: 600 s; 24h); needs prompt_cache_key."))
    return_token_ids: Flag = Field(False, description=(
        "vLLM's: each choice also lists prompt_token_ids and its generated token_ids (streamed: each chunk's "
        "new token_ids), so an agent builds its next turn from the exact ids."))
    truncate_prompt_tokens: Int | None = Field(None, ge=-1, le=INT32_MAX, description=(
        "vLLM's: keep only the prompt's last k tokens (-1: the context length)."))
    response_format: ResponseFormat | None = Field(None, description="OpenAI's: text, json_object or json_schema.")
    structured_outputs: StructuredOutputsField | None = Field(None, description="vLLM's: json, regex, choice, "
                                                              "grammar or json_object.")

    @model_validator(mode="before")
    @classmethod
    def _text_is_unicode(cls, data: Any) -> Any:
        check_unicode(data, "")
        return data


class CompletionRequest(GenerationFields):
    prompt: str | list[Int] | list[str] | list[list[Int]]
    max_tokens: Int | None = Field(None, ge=0, le=INT32_MAX, description="None: 16; 0 only with echo (the prompt "
                                   "alone, as vLLM).")
    logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: Flag = Field(False, description="Return the prompt before the completion (with its logprobs when "
                                          "logprobs is set).")
    prompt_logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="vLLM's: each prompt token's "
                                        "logprob and this many alternatives (not with stream).")
    suffix: str | None = Field(None, description="Not supported: only null or empty is accepted.")
    best_of: Int | None = Field(None, ge=1, le=INT32_MAX, description="Sample this many per prompt and return the "
                                "n of highest cumulative logprob (not with stream).")
    add_special_tokens: Flag = Field(True, description="vLLM's: the tokenizer's special tokens (BOS) around a text "
                                                       "prompt.")


def text_parts_only(content: Any, text_types: tuple[str, ...]) -> Any:
    """An image, audio or file part is refused by its type, not as 'not a valid string'."""
    for part in content if isinstance(content, list) else ():
        kind = part.get("type") if isinstance(part, dict) else None
        if isinstance(kind, str) and kind not in text_types:
            raise PydanticCustomError("unsupported_content", "content part type '{kind}' is not supported: this "
                                      "server serves text models (types {types})",
                                      {"kind": kind, "types": ", ".join(text_types)})
    return content


class TextContentPart(OpenAIModel):
    type: Literal["text"]
    text: str


class FunctionCall(OpenAIModel):
    name: str
    arguments: str
    """A JSON object, as text (OpenAI's format)."""


class AssistantToolCall(OpenAIModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIModel):
    role: str
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[AssistantToolCall] | None = None
    """An assistant message's calls (sent back in the next turn of an agent loop)."""
    tool_call_id: str | None = None
    """A `tool` message: the call it answers."""

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        return text_parts_only(content, ("text",))

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)  # vLLM joins text parts with newlines


class FunctionDefinition(OpenAIModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    """A JSON schema of the arguments object."""
    strict: Flag | None = None


class ChatTool(OpenAIModel):
    type: str
    """Only "function" is served; other types are refused by name (chat_tools.py)."""
    function: FunctionDefinition | None = None


class NamedFunction(OpenAIModel):
    name: str


class NamedToolChoice(OpenAIModel):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(GenerationFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int | None = Field(None, ge=1, le=INT32_MAX)
    logprobs: Flag = False
    top_logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: Flag = True
    continue_final_message: Flag = Field(False, description=(
        "vLLM's: render the last message open-ended (no end-of-turn), so the output continues it; "
        "needs add_generation_prompt false."))
    add_special_tokens: Flag = Field(False, description=(
        "vLLM's: the tokenizer's special tokens on top of what the chat template writes (default: none)."))
    chat_template_kwargs: dict[str, Any] | None = Field(None, description=(
        "vLLM's: extra variables for the chat template, e.g. {\"enable_thinking\": false} for Qwen3."))
    tools: list[ChatTool] | None = Field(None, description="Function tools, rendered by the chat template.")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description='Default: "auto" with tools, else "none". "auto" needs --enable-auto-tool-choice.')
    functions: list[Any] | None = Field(None, description="Not supported: only null or [] is accepted.")
    function_call: Any = Field(None, description="Not supported: only null or \"none\" is accepted.")
    parallel_tool_calls: Flag | None = Field(None, description="False: at most one call per response.")


# Fields declared above that the server does not implement: the values that mean "off".
_OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "suffix": (None, ""),
    "functions": (None, []), "function_call": (None, "none"),
}


def unsupported_field(body: GenerationFields) -> tuple[str, str] | None:
    """(field, message) for the first field the request sets to something this server does not do."""
    for name, off in _OFF_VALUES.items():
        if name in type(body).model_fields and getattr(body, name) not in off:
            return name, f"{name} is not supported by this server"
    return None
