"""Errors as JSON in OpenAI's shape, `{"error": {"message", "type", ...}}`, whatever raised them:
an endpoint (`ApiError`), the request's validation (400 naming the field), an unknown route, or
a bug (500)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger("softprompt.serve")


class ApiError(Exception):
    """An HTTP error an endpoint answers with; `extra` goes into the error object."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        headers: dict | None = None,
        **extra,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.headers = headers
        self.extra = extra

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.headers, **self.extra)


def error_response(
    status: int, message: str, type_: str, headers: dict | None = None, **extra
) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, **extra}}
    return JSONResponse(body, status, headers=headers)


def validation_message(exc: RequestValidationError) -> str:
    """A request that does not fit its model, in one line naming the fields."""
    parts = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            return f"the body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}"
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        if err.get("type") == "missing":
            parts.append(f"missing field {loc!r}")
        else:
            parts.append(f"{loc or 'body'}: {err['msg']}")
    return "; ".join(parts) or "invalid request"


def add_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: ApiError):
        return exc.response()

    async def bad_request(request: Request, exc: RequestValidationError):
        return error_response(400, validation_message(exc), "invalid_request_error")

    async def http_error(request: Request, exc: HTTPException):
        return error_response(exc.status_code, str(exc.detail), "http_error", exc.headers)

    async def crash(request: Request, exc: Exception):
        log.exception("unhandled error")
        return error_response(500, f"internal error: {exc}", "server_error")

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, bad_request)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, crash)
