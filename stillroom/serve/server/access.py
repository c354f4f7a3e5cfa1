"""Per-request operations: request ids, request metrics and one access-log line per request.

``RequestMiddleware`` sits outermost (so requests the guard refuses are counted and logged too). It
takes the client's ``X-Request-ID`` when it is a sane token (1-128 visible ASCII characters) or makes
one, echoes it in the response, counts the request in the metrics by route and status, and logs one
line on the ``stillroom.access`` logger when the last response byte is sent (streams included):
method, path, status, latency, tokens and request id, as the record's message and as ``extra``
fields that ``JsonFormatter`` writes out one by one.

Handlers add the tokens of the request they serve to ``current_request()``, a context variable the
middleware sets (streamed bodies run in child tasks, which see the same record); for LM requests
``TokenClock`` does, while it times the first token and the tokens after it for the metrics.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

from stillroom.serve.server.metrics import Metrics

access_log = logging.getLogger("stillroom.access")

CLIENT_CLOSED = 499  # no response and no error: the client hung up first ("client closed request")
_REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,128}")


@dataclass
class RequestRecord:
    """What the access-log line reports beyond the HTTP exchange itself."""

    request_id: str
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add_tokens(self, prompt: int, completion: int) -> None:
        self.prompt_tokens += prompt
        self.completion_tokens += completion


_current: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar(
    "stillroom_request", default=None
)


def current_request() -> RequestRecord | None:
    """The record of the request being served here (None outside a request)."""
    return _current.get()


def _request_id(scope) -> str:
    for name, value in scope.get("headers", []):
        if name == b"x-request-id" and _REQUEST_ID.fullmatch(value):
            return value.decode("ascii")
    return uuid.uuid4().hex


class RequestMiddleware:
    """Request id, request metrics and the access-log line (see the module doc)."""

    def __init__(self, app, metrics: Metrics, routes: set[str]) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        record = RequestRecord(_request_id(scope))
        echoed = (b"x-request-id", record.request_id.encode("ascii"))
        status = None

        async def wrapped(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), echoed]}
            await send(message)

        token = _current.set(record)
        try:
            await self.app(scope, receive, wrapped)
        except BaseException:
            status = status or 500
            raise
        finally:
            _current.reset(token)
            seconds = time.perf_counter() - start
            status = status or CLIENT_CLOSED
            self.metrics.request(scope["path"] if scope["path"] in self.routes else "other", status, seconds)
            _log_access(scope, status, seconds, record)


def _log_access(scope, status: int, seconds: float, record: RequestRecord) -> None:
    if not access_log.isEnabledFor(logging.INFO):
        return
    raw = scope.get("raw_path") or scope["path"].encode()  # raw: percent-encoded, no control characters
    path = raw.decode("ascii", "replace")[:200]
    fields = {
        "method": scope["method"],
        "path": path,
        "status": status,
        "latency_ms": round(seconds * 1000, 2),
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "request_id": record.request_id,
    }
    access_log.info(
        "%s %s %d %.1f ms tokens %d+%d id %s",
        scope["method"],
        path,
        status,
        seconds * 1000,
        record.prompt_tokens,
        record.completion_tokens,
        record.request_id,
        extra=fields,
    )


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, the record's ``extra``
    fields, and the traceback as ``exception`` when there is one."""

    # the attributes every LogRecord has, and uvicorn's colored copy of its message: not extra fields
    _STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update((k, v) for k, v in vars(record).items() if k not in self._STANDARD)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def log_as_json() -> None:
    """Every log record (stillroom's, the access log, uvicorn's) as one JSON line on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.getLogger().handlers[:] = [handler]


class TokenClock:
    """One LM request's events (``lm_worker.LMJob``) as metrics and as the access line's tokens.

    Time to first token runs from queueing (``submitted``, ``time.perf_counter()``) to the request's
    first text; time per output token is, per choice, the time from its first text to its end over
    its tokens after the first. Text is what the client gets: a token held back (half a UTF-8
    character, the start of a possible stop string) counts when its text goes out.
    """

    def __init__(self, metrics: Metrics, submitted: float) -> None:
        self.metrics, self.submitted = metrics, submitted
        self.first: dict[int, float] = {}  # choice -> when its first text arrived
        self.record = current_request()

    def observe(self, event: tuple) -> None:
        now = time.perf_counter()
        if event[0] == "delta":
            if not self.first:
                self.metrics.ttft(now - self.submitted)
            self.first.setdefault(event[1], now)
            return
        _, choice, _, prompt_tokens, completion_tokens = event
        self.metrics.prompt_tokens(prompt_tokens)
        if completion_tokens > 1 and choice in self.first:
            self.metrics.tpot((now - self.first[choice]) / (completion_tokens - 1))
        if self.record is not None:
            self.record.add_tokens(prompt_tokens, completion_tokens)
