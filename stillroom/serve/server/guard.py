"""The ASGI guard in front of every route: API key and body size, before any JSON is parsed.

The key is required on every path except ``open_paths`` (the probes, ``/metrics`` and the API docs,
unless ``--metrics-auth``): a load balancer's health check or a Prometheus scraper has no key. The
key is compared with ``hmac.compare_digest`` so the comparison time does not reveal how many
leading characters matched. Bodies are read and counted here (up to the limit) before the app sees
them, so a client that lies about or omits ``Content-Length`` is still cut off with a 413.
"""

from __future__ import annotations

import hmac

from stillroom.serve.server.errors import error_bytes


async def _send_error(send, status: int, message: str, type_: str, code: str, extra_headers=()) -> None:
    body = error_bytes(message, type_, code)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *extra_headers,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Guard:
    def __init__(
        self, app, api_key: str | None, max_body_bytes: int, open_paths: frozenset[str] = frozenset()
    ) -> None:
        self.app, self.max_body, self.open_paths = app, max_body_bytes, open_paths
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    def _authorized(self, scope) -> bool:
        if self.expected is None or scope["path"] in self.open_paths:
            return True
        given = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                given = value
        return hmac.compare_digest(given, self.expected)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self._authorized(scope):
            await _send_error(
                send,
                401,
                "missing or invalid API key (send 'Authorization: Bearer KEY')",
                "invalid_request_error",
                "invalid_api_key",
                [(b"www-authenticate", b"Bearer")],
            )
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body:
                await _send_error(
                    send,
                    413,
                    f"request body larger than {self.max_body} bytes",
                    "invalid_request_error",
                    "request_too_large",
                )
                return
        body = bytearray()
        more = True
        while more:  # buffer the (bounded) body so the limit holds without trusting Content-Length
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its body
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                await _send_error(
                    send,
                    413,
                    f"request body larger than {self.max_body} bytes",
                    "invalid_request_error",
                    "request_too_large",
                )
                return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
