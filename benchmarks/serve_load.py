"""Bounded load test of `stillroom serve` on loopback: concurrency 1, 4, 16.

Starts `stillroom serve ARTIFACT` in its own process (clients in this process must not steal the
server's interpreter), fires a fixed number of requests per concurrency level from client threads,
and prints one table: requests, errors, throughput, p50 / p99 latency. Without --artifact it builds a
tiny class-conditional MNIST-sized generator student, exports it to ONNX and serves that.

    .venv/bin/python benchmarks/serve_load.py [--artifact DIR] [--requests-per-client 12]
        [--max-batch 32] [--max-wait-ms 20] [--n 1]

Goal (issue 6): images/s at 16 clients >= 4x the single-client rate.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_artifact(root: Path) -> Path:
    sys.path.insert(0, str(REPO))
    from stillroom.plugins.diffusion.export import export_generator
    from stillroom.testing import build_tiny_generator

    student = build_tiny_generator(root / "student", steps=2, size=28)
    export_generator(student, root / "artifact")
    return root / "artifact"


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit("server did not become ready")


def _batches(url: str) -> tuple[float, float]:
    """(number of model batches, items in them) so far, from the server's /metrics."""
    text = httpx.get(f"{url}/metrics").text
    count = float(re.search(r"^stillroom_batch_size_count\{.*\} (\S+)$", text, re.M).group(1))
    total = float(re.search(r"^stillroom_batch_size_sum\{.*\} (\S+)$", text, re.M).group(1))
    return count, total


def _level(url: str, kind: str, concurrency: int, per_client: int, n: int) -> dict:
    local = threading.local()  # one keep-alive connection per client thread, like a real client

    def one(i: int) -> tuple[float, bool, int]:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=120)
        if kind == "generator":
            path, body = "/v1/images/generations", {"n": n, "class_label": i % 10, "seed": i}
        else:
            path, body = "/v1/completions", {"prompt": "To be, or not", "max_tokens": 16, "temperature": 0}
        start = time.perf_counter()
        try:
            r = local.client.post(url + path, json=body)
        except httpx.HTTPError:
            return time.perf_counter() - start, False, 0
        elapsed, ok = time.perf_counter() - start, r.status_code == 200
        if not ok:
            return elapsed, False, 0
        data = r.json()
        return elapsed, True, len(data["data"]) if kind == "generator" else data["usage"]["completion_tokens"]

    total = concurrency * per_client
    before = _batches(url)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(total)))
    wall = time.perf_counter() - start
    after = _batches(url)
    lat = np.array([t for t, ok, _ in results if ok]) * 1000
    errors = sum(not ok for _, ok, _ in results)
    items = sum(count for _, _, count in results)
    batches = after[0] - before[0]
    return {
        "mean_batch": (after[1] - before[1]) / batches if batches else float("nan"),
        "concurrency": concurrency,
        "requests": total,
        "errors": errors,
        "req_s": (total - errors) / wall,
        "items_s": items / wall,
        "p50_ms": float(np.percentile(lat, 50)) if lat.size else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) if lat.size else float("nan"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path)
    ap.add_argument("--requests-per-client", type=int, default=12)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=20.0)
    ap.add_argument("--n", type=int, default=1, help="images per request")
    ap.add_argument("--threads", type=int, help="onnxruntime intra-op threads of the server")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        artifact = args.artifact or _tiny_artifact(Path(tmp))
        import json

        kind = json.loads((artifact / "manifest.json").read_text())["kind"]
        port = _free_port()
        cmd = [
            str(Path(sys.executable).parent / "stillroom"),
            "serve",
            str(artifact),
            "--port",
            str(port),
            "--max-batch",
            str(args.max_batch),
            "--max-wait-ms",
            str(args.max_wait_ms),
        ]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.Popen(
            cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(url, proc)
            _level(url, kind, 4, 2, args.n)  # warm-up
            rows = [_level(url, kind, c, args.requests_per_client, args.n) for c in (1, 4, 16)]
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    unit = "images/s" if kind == "generator" else "tokens/s"
    print(f"| clients | requests | errors | req/s | {unit} | p50 ms | p99 ms | mean batch |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['concurrency']} | {r['requests']} | {r['errors']} | {r['req_s']:.1f} | "
            f"{r['items_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['mean_batch']:.1f} |"
        )
    ratio = rows[-1]["items_s"] / rows[0]["items_s"]
    print(f"\n{unit} at 16 clients / 1 client: {ratio:.2f}x (goal >= 4x)")


if __name__ == "__main__":
    main()
