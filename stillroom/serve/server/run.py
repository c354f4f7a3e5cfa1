"""Running the app on uvicorn: in the foreground (``stillroom serve``) or in a thread (tests, load tests).

SIGTERM (or Ctrl-C) drains: uvicorn closes the listening socket at once (new connections are
refused), lets in-flight requests, streams included, finish for up to ``grace`` seconds, cancels what
is left, runs the app's shutdown, and ``serve_forever`` returns, so ``stillroom serve`` exits 0 after
a SIGTERM. uvicorn's own loggers propagate to the process's logging setup (text or JSON lines), and
its access log is off: ``access.RequestMiddleware`` writes ours.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time

import uvicorn

LOOPBACK = "127.0.0.1"

log = logging.getLogger(__name__)


def _config(app, host: str, port: int, grace: float | None = None) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        log_level="warning",
        access_log=False,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=grace,
        lifespan="on",
        limit_concurrency=1024,
    )


class _Server(uvicorn.Server):
    """uvicorn's server, saying when a signal starts the drain."""

    def handle_exit(self, sig: int, frame) -> None:
        if not self.should_exit:
            grace = self.config.timeout_graceful_shutdown
            log.info(
                "%s: refusing new connections, finishing in-flight requests (up to %s)",
                signal.Signals(sig).name,
                "no limit" if grace is None else f"{grace:g} s",
            )
        super().handle_exit(sig, frame)


def serve_forever(app, host: str = LOOPBACK, port: int = 8000, grace: float = 30.0) -> None:
    """Serves until SIGTERM or Ctrl-C, then drains (see the module doc) and returns."""
    # uvicorn re-raises the signal it stopped for once it is done, under the handler it found: Python's
    # default for SIGTERM would kill the process (exit status -15) after a clean drain
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        _Server(_config(app, host, port, grace)).run()
    finally:
        signal.signal(signal.SIGTERM, previous)


class ServerThread:
    """A real uvicorn server on an ephemeral loopback port, in a daemon thread; entered, it has
    started and (an app from ``create_app``) its model has answered the warm-up request."""

    def __init__(self, app, host: str = LOOPBACK) -> None:
        self.ready = getattr(app, "ready", None)
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
        while not (self.server.started and (self.ready is None or self.ready.done.is_set())):
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
