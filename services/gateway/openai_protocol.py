"""OpenAI request models and the ONE mapping from failures to OpenAI error responses.

Every error the gateway answers has the body `{"error": {"message", "type", "param", "code"}}`:

    malformed JSON, wrong types, bad values, prompt too long,
    a field this server does not know or implement, a limit     -> 400 invalid_request_error
    missing or wrong API key                                    -> 401 invalid_api_key
    unknown model                                               -> 404 model_not_found
    request body over --max-request-body-bytes                  -> 413 invalid_request_error
    admission queue full                                        -> 429 (+ Retry-After)
    no healthy worker / worker failed                           -> 503
Bad input never yields 500; a 500 means a bug in the gateway.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from splitserve.services.gateway.admission import AdmissionRejected
from splitserve.services.gateway.router import NoHealthyWorker
from splitserve.services.gateway.worker_client import WorkerError

logger = logging.getLogger(__name__)

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


def unauthorized() -> APIError:
    return APIError(401, "Incorrect or missing API key: send it as `Authorization: Bearer KEY`.",
                    "invalid_request_error", None, "invalid_api_key")


def body_too_large(limit_bytes: int) -> APIError:
    return APIError(413, f"The request body is larger than this server's limit of {limit_bytes} bytes.",
                    "invalid_request_error", None, "request_too_large")


def body_timeout(timeout_s: float) -> APIError:
    return APIError(408, f"The request body did not arrive within {timeout_s:g} s.", "invalid_request_error", None,
                    "request_timeout")


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
    # Worker addresses and their error text stay in the gateway's log: a client learns the kind of
    # failure, never the internal topology.
    if isinstance(exc, NoHealthyWorker):
        logger.warning("%s", exc)
        return service_unavailable(f"no healthy {exc.role} worker is available; try again later")
    if isinstance(exc, WorkerError):
        if exc.code == grpc.StatusCode.INVALID_ARGUMENT:
            return bad_request(exc.details)  # the worker's verdict on this request's own content
        logger.warning("%s", exc)
        if exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return rate_limited(1, "the workers are at capacity; try again later")
        return service_unavailable(f"a worker failed while serving the request ({exc.code.name}); try again")
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


_LOCATIONS = ("body", "query", "path")
"""Where FastAPI found a field; the param named is the field itself."""


def validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's validation errors (JSON decoding included) -> one 400 naming the first problem."""
    errors = exc.errors()
    if not errors:
        return bad_request("invalid request")
    # A part refused by its type is the answer even where a union (input: str | items) fails first.
    first = next((e for e in errors if e.get("type") == "unsupported_content"), errors[0])
    if first.get("type") == "extra_forbidden":
        name = ".".join(str(p) for p in first.get("loc", ()) if p not in _LOCATIONS)
        return bad_request(f"{name} is not supported by this server (unknown field)", name)
    if first.get("type") == "json_invalid":
        return bad_request(f"request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}")
    loc = [str(p) for p in first.get("loc", ()) if p not in _LOCATIONS]
    # Union members add their type name to the location (prompt.str, prompt.list[int]): drop those.
    param = ".".join(p for p in loc if not any(c in p for c in "[]") and p not in ("str", "int", "float", "bool"))
    message = first.get("msg", "invalid value")
    return bad_request(f"{param}: {message}" if param else message, param or None)
