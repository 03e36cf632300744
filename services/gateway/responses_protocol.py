"""Request models of the Responses API (`POST /v1/responses`), beside request_models.py's.

The request itself, its tool choice and its `text` settings forbid unknown fields, so anything we
do not serve is a 400 naming it; input items ignore the extra keys clients echo back from earlier
outputs (`id`, `status`, `annotations`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from splitserve.services.gateway.request_models import (MAX_PROMPT_CACHE_KEY_CHARS, Flag, Float, Int, OpenAIModel,
                                                        text_parts_only)


TEXT_PART_TYPES = ("input_text", "output_text", "text")


class InputText(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["input_text", "output_text", "text"]
    text: str


class MessageItem(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText]

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        return text_parts_only(content, TEXT_PART_TYPES)

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[InputText]

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


class ReasoningItem(BaseModel):
    """Reasoning of an earlier turn, sent back by clients; templates drop it, and so do we."""
    model_config = ConfigDict(extra="ignore")
    type: Literal["reasoning"]


InputItem = FunctionCallItem | FunctionCallOutputItem | ReasoningItem | MessageItem


class FunctionTool(OpenAIModel):
    """OpenAI's function tool; any other key is a 400 naming it (as in the rest of the request)."""
    type: str
    """Only "function" is served; other types are rejected by name (before their own keys are)."""
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: Flag | None = None
    """As on chat completions: under tool_choice auto, calls held to the schema (chat_tools.py)."""

    @model_validator(mode="before")
    @classmethod
    def _other_types_by_type(cls, data: Any) -> Any:
        # A web_search tool is refused for its type, not for its search_context_size key.
        if isinstance(data, dict) and data.get("type") != "function":
            return {"type": data.get("type")}
        return data


class NamedFunctionChoice(OpenAIModel):
    type: Literal["function"]
    name: str


class TextFormat(OpenAIModel):
    type: Literal["text"]


class TextConfig(OpenAIModel):
    format: TextFormat | None = None


class ResponsesRequest(OpenAIModel):

    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: Flag | None = None
    previous_response_id: str | None = None
    store: Flag = True
    """Keep this response for a later `previous_response_id`, GET and input_items (bounded in count
    and time); false: nothing is kept."""
    prompt_cache_key: str | None = Field(None, min_length=1, max_length=MAX_PROMPT_CACHE_KEY_CHARS)
    """As on chat completions (session routing and retention). None with previous_response_id:
    the previous response's chain key."""
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    stream: Flag = False
    max_output_tokens: Int | None = Field(None, ge=1)
    temperature: Float | None = Field(None, ge=0.0)
    top_p: Float | None = Field(None, gt=0.0, le=1.0)
    seed: Int | None = None
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = Field(
        None, max_length=16)
    """OpenAI's limits: 16 pairs, keys of at most 64 characters, values of at most 512."""
    user: str | None = None
    text: TextConfig | None = None
    truncation: Literal["disabled"] | None = None
    include: list[str] | None = None
    """Nothing extra is included; an empty list is accepted."""

    @field_validator("include")
    @classmethod
    def _includes_nothing(cls, include: list[str] | None) -> list[str] | None:
        if include:
            raise PydanticCustomError("unsupported_include", "include '{item}' is not supported: this server adds "
                                      "no extra data to a response (send an empty list or leave it out)",
                                      {"item": include[0]})
        return include
