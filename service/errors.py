"""HTTP errors as ``{"error": {"code": "<snake_case>", "message": "..."}}`` and nothing else.

Routes raise :class:`ServiceError` (status, code, message, optional headers such as
``Retry-After``). :func:`install_error_handlers` turns it, FastAPI's validation errors, Starlette's
HTTP errors and any unexpected exception into that JSON shape; an unexpected exception is logged
with its traceback on the server and answered with a plain 500 — no stack trace reaches a client.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("lift.service")

_STATUS_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    406: "not_acceptable", 413: "payload_too_large", 415: "unsupported_media_type", 422: "invalid_parameter",
    429: "queue_full", 500: "internal_error", 503: "unavailable", 504: "timeout",
}


class ServiceError(Exception):
    """An expected failure with its HTTP status, a stable snake_case code and a helpful message."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        where = ".".join(str(p) for p in loc if p not in ("query", "body", "path"))
        if err.get("type") == "missing" and loc[:1] == ("query",):  # curl -F x=10 sends it in the body
            parts.append(f"{where}: required query parameter missing; put it in the URL, e.g. ?{where}=...")
            continue
        parts.append(f"{where or 'request'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI, domain_errors: dict[type[Exception], int | None] | None = None) -> None:
    """``domain_errors``: exception classes with ``code`` and ``message`` (the predictor's, the
    codec's) and the HTTP status each is answered with (None: the exception's own ``status``)."""
    @app.exception_handler(ServiceError)
    async def _service_error(_request: Request, exc: ServiceError):
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    for error_class, status in (domain_errors or {}).items():
        async def _domain_error(_request: Request, exc: Exception, status: int | None = status):
            return error_response(status or exc.status, exc.code, exc.message)

        app.add_exception_handler(error_class, _domain_error)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError):
        return error_response(422, "invalid_parameter", _describe_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = _STATUS_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        # Starlette's own texts ("Not Found", "Method Not Allowed") say neither what nor what to do.
        if exc.status_code == 404 and message == "Not Found":
            message = f"there is no {request.url.path} here; the endpoints are listed at /docs"
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "another method")
            message = f"{request.method} is not allowed on {request.url.path}; use {allowed} (see /docs)"
        return error_response(exc.status_code, code, message, dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal server error; the server log has the details")
