"""Errors in OpenAI's JSON shape: ``{"error": {"message", "type", "param", "code"}}`` with the right status.

Owns: ``APIError`` (raised by handlers), the mapping of engine exceptions to HTTP statuses, and the
FastAPI exception handlers that turn every failure (validation, unknown route, bug) into that shape.
Bad input is a 4xx; a 500 means a bug in the server, never in the request.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from autoglm_jax.engine.async_engine import EngineStoppedError

log = logging.getLogger(__name__)

# OpenAI's ``error.type`` by status (the openai client maps statuses to exception classes).
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
                503: "service_unavailable_error"}


class APIError(Exception):
    """A request the server refuses: HTTP ``status`` and an OpenAI error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    error_type = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def from_engine_error(error: Exception) -> APIError:
    """The APIError for an exception ``AutoGLMEngine.submit`` raised, or the error itself re-raised."""
    if isinstance(error, OverflowError):
        return APIError(429, f"the server is overloaded: {error}; retry later", code="too_many_requests")
    if isinstance(error, EngineStoppedError):
        return APIError(503, f"the engine is not serving: {error}", code="engine_stopped")
    if isinstance(error, (ValueError, TypeError)):
        return APIError(400, str(error))
    raise error


def _validation_message(error: RequestValidationError) -> str:
    parts = []
    for item in error.errors()[:5]:
        location = ".".join(str(p) for p in item.get("loc", ()) if p != "body") or "body"
        parts.append(f"{location}: {item.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return JSONResponse(error_body(400, _validation_message(error), param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = error.detail if isinstance(error.detail, str) else HTTPStatus(error.status_code).phrase
        return JSONResponse(error_body(error.status_code, message), status_code=error.status_code,
                            headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error serving %s", request.url.path)
        return JSONResponse(error_body(500, f"internal server error: {type(error).__name__}"), status_code=500)
