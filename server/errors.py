"""One error shape on the wire: OpenAI's ``{"error": {"message", "type", "param", "code"}}``.

``HTTP_STATUS`` is the only place an ErrorCode becomes an HTTP status.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from loraflow.registry.errors import ErrorCode, LoraflowError, RateLimitedError
from loraflow.server.engine.protocol import EngineRequestError

# The `code` of an error nobody anticipated. Its message never carries the exception's text.
INTERNAL_ERROR_CODE = "internal_error"
# nginx's status for a client that closed the connection before its response: never sent (nobody
# is left to read it), but logged and counted as such rather than as a gateway error.
CLIENT_CLOSED_REQUEST = 499

log = logging.getLogger("loraflow.gateway")

HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_ARGUMENT: 400,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.TIMEOUT: 408,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.INVALID_ADAPTER: 400,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.CONFLICT: 409,
    ErrorCode.GATE_REFUSED: 409,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.PERMISSION_DENIED: 403,
    ErrorCode.OVERLOADED: 429,
    ErrorCode.ENGINE_UNAVAILABLE: 503,
    ErrorCode.SCHEMA_OUT_OF_DATE: 503,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.INTEGRITY: 500,
    ErrorCode.MISSING_DEPENDENCY: 500,
}

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    408: "invalid_request_error",
    409: "invalid_request_error",
    429: "rate_limit_error",
}


def error_body(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    kind = _TYPES.get(status, "server_error" if status < 503 else "service_unavailable_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(status, message, param=param, code=code), status_code=status, headers=headers
    )


def sse_error(message: str, *, code: str) -> bytes:
    """An error after a stream has started: one SSE event in the same shape (vLLM does the same)."""
    return b"data: " + json.dumps(error_body(500, message, code=code)).encode() + b"\n\n"


def client_closed(request: Request) -> Response:
    """The client left before its request body arrived (:class:`ClientDisconnect`): a 499 that no
    one will read, and one line in the log, not an unexpected error with a traceback."""
    log.info(
        "client closed the connection before its request body arrived (%d): %s %s",
        CLIENT_CLOSED_REQUEST,
        request.method,
        request.url.path,
    )
    return Response(status_code=CLIENT_CLOSED_REQUEST)


# Answered before the body was read whole (or at all): the client may still be sending it, so
# the connection is closed rather than its bytes read and thrown away (a 30 MiB body with no
# key costs the gateway nothing past its headers).
_BODY_LEFT_UNREAD = frozenset({ErrorCode.UNAUTHENTICATED, ErrorCode.TOO_LARGE, ErrorCode.TIMEOUT})


def from_exception(exc: LoraflowError, *, retry_after_s: int = 5) -> JSONResponse:
    if isinstance(exc, EngineRequestError):
        return error_response(exc.status, exc.message, param=exc.param, code=str(exc.status))
    status = HTTP_STATUS.get(exc.code, 500)
    code = "model_not_found" if exc.code == ErrorCode.NOT_FOUND and exc.param == "model" else exc.code.value
    if isinstance(exc, RateLimitedError):  # it knows when the key's budget frees up
        retry_after_s = max(1, math.ceil(exc.retry_after_s))
    headers = {"Retry-After": str(retry_after_s)} if status in (429, 503) else {}
    if exc.code in _BODY_LEFT_UNREAD:
        headers["Connection"] = "close"  # the rest of the body is not read: the connection goes
    return error_response(status, exc.message, param=exc.param, code=code, headers=headers or None)


def install(app: FastAPI, *, retry_after_s: int) -> None:
    async def on_loraflow(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, LoraflowError)
        return from_exception(exc, retry_after_s=retry_after_s)

    async def on_validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        first: dict[str, Any] = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", []) if p != "body"]
        return error_response(
            400,
            f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}",
            param=".".join(loc) or None,
            code="invalid_request",
        )

    async def on_http(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        return error_response(exc.status_code, str(exc.detail), code=str(exc.status_code))

    async def on_client_closed(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ClientDisconnect)
        return client_closed(request)

    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Starlette logs the traceback after this response is sent; the client never sees it.
        return error_response(500, "internal error in the gateway", code=INTERNAL_ERROR_CODE)

    app.add_exception_handler(LoraflowError, on_loraflow)
    app.add_exception_handler(Exception, on_unexpected)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(HTTPException, on_http)
    app.add_exception_handler(ClientDisconnect, on_client_closed)
