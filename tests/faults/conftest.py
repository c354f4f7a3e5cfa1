"""Shared by the fault, fuzz and load tests: tiny artifacts built once, and `stillroom serve` processes.

Exports take 10-20 s each on a small CPU, so the tiny LM and generator (students and their ONNX
artifacts) are built once per test session; tests that damage an artifact damage a copy.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import STILLROOM, cli_env

FORBIDDEN_IN_BODIES = ("Traceback", 'File "', "site-packages", "/stillroom/")


@pytest.fixture(scope="session")
def lm_student(tmp_path_factory) -> Path:
    from stillroom.testing import build_tiny_lm

    return build_tiny_lm(tmp_path_factory.mktemp("faults-lm") / "student", family="llama")


@pytest.fixture(scope="session")
def gen_student(tmp_path_factory) -> Path:
    from stillroom.testing import build_tiny_generator

    return build_tiny_generator(tmp_path_factory.mktemp("faults-gen") / "student", steps=2, size=8)


@pytest.fixture(scope="session")
def lm_art(lm_student) -> Path:
    from stillroom.plugins.lm.export.onnx_artifact import export_causal_lm

    return export_causal_lm(lm_student, lm_student.parent / "artifact").root


@pytest.fixture(scope="session")
def gen_art(gen_student) -> Path:
    from stillroom.plugins.diffusion.export import export_generator

    return export_generator(gen_student, gen_student.parent / "artifact").root


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """A `stillroom serve` child process on loopback: its URL, its pid and its stderr file."""

    def __init__(self, proc: subprocess.Popen, url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log

    @property
    def pid(self) -> int:
        return self.proc.pid


@contextmanager
def serve(artifact: Path, workdir: Path, *args: str, timeout: float = 120):
    """Starts `stillroom serve ARTIFACT --port P ...` with ``workdir`` as its cwd, ready (its model warm);
    stops it after."""
    port = free_port()
    log = workdir.parent / f"{workdir.name}-serve-{port}.log"
    workdir.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [
                STILLROOM,
                "serve",
                str(artifact),
                "--port",
                str(port),
                "--provider",
                "cpu",
                "--threads",
                "1",
                *args,
            ],
            cwd=workdir,
            env=cli_env(),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    url = f"http://127.0.0.1:{port}"
    served = Served(proc, url, log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"stillroom serve exited {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                # 503 until the model answered its warm-up request; 401: --metrics-auth
                if httpx.get(f"{url}/ready", timeout=2).status_code in (200, 401):
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"stillroom serve did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield served
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def batch_size_histogram(metrics_text: str) -> dict[float, float]:
    """``{le: cumulative count}`` of the ``stillroom_batch_size`` histogram in a /metrics page
    (``le`` as a number: ``1.0`` and ``1`` are the same bucket; ``+Inf`` is ``inf``)."""
    out: dict[float, float] = {}
    for line in metrics_text.splitlines():
        if line.startswith("stillroom_batch_size_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[float(le)] = float(line.rsplit(" ", 1)[1])
    return out


def multi_row_batches(metrics_text: str) -> float:
    """How many model batches held more than one row or image (micro-batching at work)."""
    hist = batch_size_histogram(metrics_text)
    return hist.get(float("inf"), 0.0) - hist.get(1.0, 0.0)


def status_counts(metrics_text: str) -> dict[int, float]:
    """Requests by HTTP status from ``stillroom_requests_total``, without ``/ready``: ``serve`` polls it
    until the model is warm, and each poll before that is a 503 (how slow the warm-up is varies)."""
    counts: dict[int, float] = {}
    for line in metrics_text.splitlines():
        if 'endpoint="/ready"' in line:
            continue
        if line.startswith("stillroom_requests_total{") and 'status="' in line:
            status = int(line.split('status="', 1)[1].split('"', 1)[0])
            counts[status] = counts.get(status, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts
