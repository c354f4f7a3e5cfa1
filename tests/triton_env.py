"""A real Triton Inference Server for tests: the ``tritonserver`` binary and Python backend that the
``nvidia-pytriton`` wheel bundles, run on CPU from a venv of its own (``shared/CONSUMERS.md``).

The venv is built once under ``~/.cache/stillroom-test/triton-venv-<hash>`` (``STILLROOM_TEST_CACHE``
moves it), the hash covering ``REQUIREMENTS`` and the Python version, and reused by every later run.
It holds stillroom's runtime dependencies without torch, and numpy < 2: the backend stub reads BYTES
tensors wrongly under numpy 2. stillroom itself is installed editable and without dependencies, again
whenever this checkout's path or ``pyproject.toml`` changes. Anything that stops the venv or the
server from coming up raises ``TritonUnavailable`` with the reason (the tests skip with it).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
REQUIREMENTS = (
    "nvidia-pytriton==0.7.0",  # tritonserver + Python backend stubs for Python 3.8-3.13
    "numpy<2",
    "onnxruntime>=1.19",
    "tokenizers>=0.20",
    "transformers>=4.46",  # AutoTokenizer; it runs without torch
    "pydantic>=2.6",
    "pluggy>=1.5",
    "setuptools>=68",  # the editable install of stillroom, built without isolation (no download)
    "wheel",
)
PIP_TIMEOUT_S = 420  # below pytest's 600 s timeout: a stuck pip skips the tests, not fails them
READY_TIMEOUT_S = 180


class TritonUnavailable(Exception):
    """The venv or the server could not be brought up; the message says why."""


def cache_dir() -> Path:
    return Path(os.environ.get("STILLROOM_TEST_CACHE", Path.home() / ".cache" / "stillroom-test"))


def _run(cmd: list[str], what: str, timeout: float = PIP_TIMEOUT_S) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise TritonUnavailable(f"{what} took over {timeout:.0f} s") from err
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise TritonUnavailable(f"{what} failed: {tail}")
    return proc.stdout


def _key() -> str:
    text = "\n".join([*REQUIREMENTS, f"python {sys.version_info.major}.{sys.version_info.minor}"])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def server_dir(venv: Path) -> Path:
    """``pytriton/tritonserver`` inside the venv (found without importing pytriton, which needs gevent)."""
    found = sorted(venv.glob("lib/python*/site-packages/pytriton/tritonserver"))
    if not found:
        raise TritonUnavailable(f"no pytriton/tritonserver in {venv}")
    return found[0]


def _build(venv: Path) -> None:
    """A fresh venv with ``REQUIREMENTS`` and the Python backend stub for its Python version."""
    shutil.rmtree(venv, ignore_errors=True)
    _run([sys.executable, "-m", "venv", str(venv)], "creating the venv")
    _run([str(venv / "bin" / "pip"), "install", "-q", *REQUIREMENTS], "pip install of the Triton venv")
    tritonserver = server_dir(venv)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = tritonserver / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonUnavailable(f"nvidia-pytriton ships no Python backend stub for Python {version}")
    shutil.copy2(stub, tritonserver / "backends" / "python" / stub.name)
    (venv / ".complete").write_text("\n".join(REQUIREMENTS) + "\n")


def _install_stillroom(venv: Path) -> None:
    stamp = f"{REPO}\n{hashlib.sha256((REPO / 'pyproject.toml').read_bytes()).hexdigest()}\n"
    marker = venv / ".stillroom"
    if marker.is_file() and marker.read_text() == stamp:
        return
    pip = [str(venv / "bin" / "pip"), "install", "-q", "--no-deps", "--no-build-isolation"]
    _run([*pip, "-e", str(REPO)], "pip install -e stillroom into the Triton venv")
    marker.write_text(stamp)


def triton_venv() -> Path:
    """The cached venv, built or updated under a lock (two test runs may start at once)."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    venv = root / f"triton-venv-{_key()}"
    with open(root / "triton-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (venv / ".complete").is_file():
            _build(venv)
        _install_stillroom(venv)
    return venv


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TritonServer:
    """``tritonserver`` over ``repositories`` with ``models`` loaded explicitly, HTTP on a free port.

    The server is this process's child in its own process group; leaving the ``with`` block stops
    it (SIGTERM, then SIGKILL to its group: the backend stubs are its children).
    """

    def __init__(self, venv: Path, repositories: list[Path], models: list[str], log: Path) -> None:
        self.venv, self.repositories, self.models, self.log = venv, repositories, models, log
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        tritonserver = server_dir(self.venv)
        cmd = [
            str(tritonserver / "bin" / "tritonserver"),
            "--backend-directory",
            str(tritonserver / "backends"),
        ]
        cmd += [f"--model-repository={repo}" for repo in self.repositories]
        cmd += ["--model-control-mode=explicit", *[f"--load-model={m}" for m in self.models]]
        cmd += [f"--http-port={self.port}", "--allow-grpc=false", "--allow-metrics=false"]
        # python backend shared-memory regions are named by this prefix: unique, so runs never collide
        return [*cmd, f"--backend-config=python,shm-region-prefix-name=stillroom_test_{os.getpid()}_"]

    def env(self) -> dict[str, str]:
        """The venv's python first on PATH (the stub runs it) and the libpython it was built from."""
        libdir = _run(
            [
                str(self.venv / "bin" / "python"),
                "-c",
                "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))",
            ],
            "asking the venv for its LIBDIR",
        ).strip()
        env = dict(os.environ, PATH=f"{self.venv / 'bin'}:{os.environ.get('PATH', '')}")
        env.update({"LD_LIBRARY_PATH": libdir, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
        env.pop("PYTHONPATH", None)
        return env

    def __enter__(self) -> TritonServer:
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"tritonserver was not ready after {READY_TIMEOUT_S} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(timeout=30)

    def infer(self, model: str, inputs: list[dict[str, Any]]) -> Any:
        """``POST /v2/models/MODEL/infer`` (KServe v2 JSON); the ``httpx`` response."""
        import httpx

        return httpx.post(f"{self.url}/v2/models/{model}/infer", json={"inputs": inputs}, timeout=300)
