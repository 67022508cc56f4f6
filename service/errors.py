"""The one error shape of the /v1 API: {"error": {"code": "...", "message": "..."}}."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import Receive, Scope, Send

# The scope key where an error answer leaves its code, for the request middleware to count
# (``ntm_errors_total{code}``): every error of either API's shape is an ``ErrorResponse``.
ERROR_CODE_SCOPE_KEY = "ntm.error_code"


class APIError(Exception):
    """An error the client can act on: an HTTP status, a stable code and a message."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}
        self.extra = extra


class ErrorResponse(JSONResponse):
    """A JSON error answer that notes its code in the request's scope as it is sent."""

    def __init__(self, content: Any, status: int, code: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(content, status_code=status, headers=headers)
        self.code = code

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[ERROR_CODE_SCOPE_KEY] = self.code
        await super().__call__(scope, receive, send)


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return ErrorResponse(error_body(code, message, **extra), status, code, headers)


# The Open Inference Protocol's paths answer errors in its own shape, {"error": "message"}.
PROTOCOL_TREES = ("/v2/health", "/v2/models", "/v2/repository", "/v2/systemsharedmemory", "/v2/cudasharedmemory")


def is_protocol_path(path: str) -> bool:
    return path.rstrip("/") == "/v2" or any(path == tree or path.startswith(tree + "/") for tree in PROTOCOL_TREES)


def v2_error_response(
    status: int, message: str, headers: dict[str, str] | None = None, code: str | None = None
) -> JSONResponse:
    """The protocol's shape carries no code; the metrics count it under ``code`` or the status' name."""
    return ErrorResponse({"error": message}, status, code or status_code_name(status), headers)


def error_response_for(
    path: str, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The error in the shape of the API that ``path`` belongs to: /v2's protocol shape or /v1's."""
    if is_protocol_path(path):
        return v2_error_response(status, message, headers)
    return error_response(status, code, message, headers)


def status_code_name(status: int) -> str:
    """The error code of an HTTP status with no code of the service's own (404 -> not_found)."""
    return _STATUS_CODES.get(status, "http_error")


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
    503: "unavailable",
}


def _describe(errors: list[dict[str, Any]]) -> str:
    parts = []
    for error in errors[:5]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {error.get('msg', 'invalid').removeprefix('Value error, ')}")
    return "; ".join(parts) + (f" (and {len(errors) - 5} more)" if len(errors) > 5 else "")


def api_error_response(exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message, exc.headers, **exc.extra)


def validation_error_response(exc: RequestValidationError) -> JSONResponse:
    return error_response(422, "invalid_request", _describe(list(exc.errors())))


METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> str:
    """The ``Allow`` header of a 405, which must list the methods the resource supports (RFC 9110,
    15.5.6). Starlette's own names only the methods of the first route whose path matched, half the
    story for a path that two routes serve (``GET`` and ``DELETE /v1/sessions/{id}``); so each method
    is tried against the app's routes, through their public ``matches``, which sees into included
    routers as routing does."""
    routes = request.app.router.routes
    allowed = [
        method
        for method in METHODS
        if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)
    ]
    return ", ".join(allowed)


def install_error_handlers(app: FastAPI) -> None:
    """Every error, FastAPI's own included, leaves in the one shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return api_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": allowed_methods(request)}
        return error_response(exc.status_code, status_code_name(exc.status_code), str(exc.detail), headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return error_response(500, "internal_error", "internal server error")
