"""Running the app on uvicorn: in the foreground (``stillroom serve``) or in a thread (tests, load tests)."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

LOOPBACK = "127.0.0.1"


def _config(app, host: str, port: int) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        timeout_keep_alive=5,
        lifespan="on",
        limit_concurrency=1024,
    )


def serve_forever(app, host: str = LOOPBACK, port: int = 8000) -> None:
    uvicorn.Server(_config(app, host, port)).run()


class ServerThread:
    """A real uvicorn server on an ephemeral loopback port, in a daemon thread."""

    def __init__(self, app, host: str = LOOPBACK) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(_config(app, host, self.port))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
