"""The one place where exceptions become OpenAI error objects: as a JSON answer (from
the hot path or from Litestar's handlers) and as the SSE event that ends a broken stream."""

from __future__ import annotations

import logging
import re

import msgspec
from granian.rsgi import HTTPProtocol
from litestar import Request, Response
from litestar.exceptions import HTTPException

from appliance.errors import ApplianceError

log = logging.getLogger("appliance.gateway")

INTERNAL_ERROR = "The gateway hit an internal error; see its log."
DONE_EVENT = b"data: [DONE]\n\n"


def error_body(message: str, type_: str, *, param=None, code=None) -> bytes:
    return msgspec.json.encode({"error": {"message": message, "type": type_, "param": param, "code": code}})


def body_of(exc: ApplianceError) -> bytes:
    return error_body(exc.message, exc.type, param=exc.param, code=exc.code)


def headers_of(exc: ApplianceError) -> dict[str, str]:
    headers = exc.headers()
    if exc.request_id:
        headers["x-request-id"] = exc.request_id
    return headers


def error_event(exc: ApplianceError) -> bytes:
    """Ends a stream that failed after it started: an error event, then [DONE]."""
    return b"data: " + body_of(exc) + b"\n\n" + DONE_EVENT


def internal_error(exc: Exception, request_id: str | None = None) -> ApplianceError:
    """A bug, logged with its traceback, as a 500 for the client."""
    log.error("unhandled error answering %s", request_id or "a request", exc_info=exc)
    error = ApplianceError(INTERNAL_ERROR)
    error.request_id = request_id
    return error


def respond_error(proto: HTTPProtocol, exc: ApplianceError) -> None:
    """The error as a raw RSGI answer (the hot path runs outside Litestar)."""
    headers = [("content-type", "application/json"), *((name.lower(), value) for name, value in headers_of(exc).items())]
    proto.response_bytes(exc.status, headers, body_of(exc))


def _json(body: bytes, status: int, headers=None) -> Response:
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def appliance_error_handler(request: Request, exc: ApplianceError) -> Response:
    return _json(body_of(exc), exc.status, headers_of(exc))


_NAMED_PARAMETER = re.compile(r"parameter '([^']+)'")


def http_error_handler(request: Request, exc: HTTPException) -> Response:
    """Litestar's own errors (unknown route, wrong method, a bad or missing query parameter)."""
    status = exc.status_code
    message = exc.detail if status != 404 else f"Unknown path {request.url.path}"
    param = code = None
    if isinstance(exc.extra, list) and exc.extra and isinstance(exc.extra[0], dict) and exc.extra[0].get("key"):
        param, code = exc.extra[0]["key"], "invalid_value"  # as for a bad body field (appliance.errors.invalid_value)
        message = f"Invalid value for '{param}': {exc.extra[0].get('message')}"
    elif status == 400 and (named := _NAMED_PARAMETER.search(message)):
        param = named.group(1)
    type_ = "server_error" if status >= 500 else "invalid_request_error"
    return _json(error_body(message, type_, param=param, code=code), status, exc.headers)


def internal_error_handler(request: Request, exc: Exception) -> Response:
    error = internal_error(exc, f"{request.method} {request.url.path}")
    return _json(body_of(error), error.status)


EXCEPTION_HANDLERS = {
    ApplianceError: appliance_error_handler,
    HTTPException: http_error_handler,
    Exception: internal_error_handler,
}
