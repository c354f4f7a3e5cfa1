"""OpenAI-style error bodies: ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status.

Anything a client can get wrong (bad JSON, wrong types, out-of-range values, unknown model, missing
key, oversized body, full queue) is answered with such a body; a 5xx only ever means a server bug.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import JSONResponse


class ApiError(Exception):
    """An error to send to the client as an OpenAI-style body (with ``headers``, e.g. ``Retry-After``)."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def error_body(
    message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(err: ApiError) -> JSONResponse:
    body = error_body(err.message, err.type, err.param, err.code)
    return JSONResponse(body, status_code=err.status, headers=err.headers)


def error_bytes(status_message: str, type_: str, code: str) -> bytes:
    return json.dumps(error_body(status_message, type_, None, code)).encode()


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One line from pydantic / FastAPI validation errors, and the offending parameter."""
    first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value").removeprefix("Value error, ")  # pydantic's ValueError prefix
    return (f"{param}: {msg}" if param else msg), param


RETRY_AFTER_S = 1  # what a 429 tells the client to wait: a queue drains in about a batch's time


def queue_full() -> ApiError:
    """The 429 of a full request queue, with ``Retry-After`` (the app's error handler counts it)."""
    return ApiError(
        429,
        "the server is busy (request queue full); retry later",
        "server_busy",
        code="queue_full",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )
