"""OpenAI request models and the ONE mapping from failures to OpenAI error responses.

Every error the gateway answers has the body `{"error": {"message", "type", "param", "code"}}`:

    malformed JSON, wrong types, bad values, prompt too long    -> 400 invalid_request_error
    unknown model                                               -> 404 model_not_found
    admission queue full                                        -> 429 (+ Retry-After)
    no healthy worker / worker failed                           -> 503
Bad input never yields 500; a 500 means a bug in the gateway.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from splitserve.services.gateway.admission import AdmissionRejected
from splitserve.services.gateway.router import NoHealthyWorker
from splitserve.services.gateway.worker_client import WorkerError

logger = logging.getLogger(__name__)

MAX_LOGPROBS = 20


class APIError(Exception):
    """An error answered to the client in OpenAI's format."""

    def __init__(self, status_code: int, message: str, type: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code, self.message, self.type = status_code, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, "invalid_value" if param else None)


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model `{model}` does not exist.", "invalid_request_error", "model", "model_not_found")


def rate_limited(retry_after_s: int, message: str) -> APIError:
    return APIError(429, message, "rate_limit_error", None, "rate_limit_exceeded",
                    headers={"Retry-After": str(retry_after_s)})


def service_unavailable(message: str) -> APIError:
    return APIError(503, message, "service_unavailable", None, "service_unavailable")


def to_api_error(exc: BaseException) -> APIError | None:
    """The client-facing error for a failure of the pipeline (None: a bug, answered as 500)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, AdmissionRejected):
        return rate_limited(exc.retry_after_s, str(exc))
    if isinstance(exc, NoHealthyWorker):
        return service_unavailable(str(exc))
    if isinstance(exc, WorkerError):
        if exc.code == grpc.StatusCode.INVALID_ARGUMENT:
            return bad_request(exc.details)
        if exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return rate_limited(1, f"worker {exc.url} is at capacity: {exc.details}")
        return service_unavailable(str(exc))
    return None


def install_error_handlers(app: FastAPI) -> None:
    """Route every failure through `APIError`'s JSON shape."""

    @app.exception_handler(APIError)
    @app.exception_handler(AdmissionRejected)
    @app.exception_handler(NoHealthyWorker)
    @app.exception_handler(WorkerError)
    async def _api_error(_: Request, exc: Exception) -> JSONResponse:
        return _api_error_response(to_api_error(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _api_error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in the gateway")
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "internal_error"), status_code=500)


def _api_error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)


def validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's validation errors (JSON decoding included) -> one 400 naming the first problem."""
    errors = exc.errors()
    if not errors:
        return bad_request("invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return bad_request(f"request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # Union members add their type name to the location (prompt.str, prompt.list[int]): drop those.
    param = ".".join(p for p in loc if not any(c in p for c in "[]") and p not in ("str", "int", "float", "bool"))
    message = first.get("msg", "invalid value")
    return bad_request(f"{param}: {message}" if param else message, param or None)


# ---- request models ---------------------------------------------------------------------------

class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions (vLLM's extensions included)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    min_tokens: int = Field(0, ge=0)
    n: int = Field(1, ge=1)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    priority: int = 0
    user: str | None = None


class CompletionRequest(GenerationFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None


class TextContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[TextContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(GenerationFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
