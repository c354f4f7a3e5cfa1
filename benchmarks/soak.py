"""Soak test of `stillroom serve` on loopback: N concurrent clients for T seconds, bounded in count and time.

Each client thread has its own HTTP connection and sends requests back to back until the deadline
(LM: a short completion; generator: one image of a random class). Reports requests, errors (any
non-200 or transport error), throughput, p50 / p99 latency, and from the server's /metrics how many
model batches held more than one item (micro-batching at work) and the largest batch bucket.

    .venv/bin/python benchmarks/soak.py --artifact DIR [--clients 64] [--seconds 30]

`tests/faults/test_soak.py` runs it against tiny artifacts (16 x 5 s by default, 64 x 30 s with -m slow).
"""

from __future__ import annotations

import argparse
import random
import threading
import time

import httpx
import numpy as np


def _body(kind: str, rng: random.Random) -> tuple[str, dict]:
    if kind == "causal-lm":
        prompt = rng.choice(["To be, or not to be", "Whether 'tis nobler", "The slings and arrows"])
        body = {"prompt": prompt, "max_tokens": 8, "temperature": 0.8, "seed": rng.randrange(1000)}
        return "/v1/completions", body
    return "/v1/images/generations", {"class_label": rng.randrange(10), "n": 1, "seed": rng.randrange(1000)}


def soak(url: str, kind: str, clients: int, seconds: float, max_requests: int = 200_000) -> dict:
    """Runs the load; returns counts, latency percentiles (ms) and the server's batch-size histogram."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    budget = [max_requests]

    def client(index: int) -> None:
        rng = random.Random(index)
        with httpx.Client(base_url=url, timeout=60) as http:
            while time.monotonic() < deadline:
                with lock:
                    if budget[0] <= 0:
                        return
                    budget[0] -= 1
                path, body = _body(kind, rng)
                started = time.perf_counter()
                try:
                    r = http.post(path, json=body)
                    ok = r.status_code == 200
                    problem = None if ok else f"{r.status_code} {r.text[:200]}"
                except httpx.HTTPError as err:
                    problem = f"{type(err).__name__}: {err}"
                elapsed = time.perf_counter() - started
                with lock:
                    if problem is None:
                        latencies.append(elapsed)
                    else:
                        errors.append(problem)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 120)
    wall = time.perf_counter() - started
    from prometheus_client.parser import text_string_to_metric_families

    metrics = httpx.get(f"{url}/metrics", timeout=30).text
    hist = {  # bucket upper bound (as a float: the library writes le="1.0") -> cumulative count
        float(s.labels["le"]): s.value
        for family in text_string_to_metric_families(metrics)
        if family.name == "stillroom_batch_size"
        for s in family.samples
        if s.name.endswith("_bucket")
    }
    lat = np.array(latencies) * 1000 if latencies else np.zeros(1)
    return {
        "kind": kind,
        "clients": clients,
        "seconds": round(wall, 1),
        "requests": len(latencies) + len(errors),
        "ok": len(latencies),
        "errors": len(errors),
        "first_errors": errors[:3],
        "req_per_s": round(len(latencies) / wall, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "max_ms": round(float(lat.max()), 1),
        "batches": hist.get(float("inf"), 0.0),
        "multi_item_batches": hist.get(float("inf"), 0.0) - hist.get(1.0, 0.0),
        "batch_histogram": {str(k): v for k, v in hist.items()},
    }


def table(rows: list[dict]) -> str:
    head = [
        "kind",
        "clients",
        "seconds",
        "requests",
        "errors",
        "req_per_s",
        "p50_ms",
        "p99_ms",
        "max_ms",
        "batches",
        "multi_item_batches",
    ]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    lines += [" | ".join(str(row[h]) for h in head) for row in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True, help="a running `stillroom serve`, e.g. http://127.0.0.1:8000")
    ap.add_argument("--kind", choices=["causal-lm", "generator"], required=True)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=30.0)
    args = ap.parse_args()
    print(table([soak(args.url, args.kind, args.clients, args.seconds)]))


if __name__ == "__main__":
    main()
