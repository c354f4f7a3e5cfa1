"""Prometheus metrics in the text exposition format (version 0.0.4), written by hand.

Counters of requests by endpoint and status, a request-latency histogram, a histogram of the batch
sizes the micro-batcher formed, the queue depth, and generated tokens / images. Updated from the
event loop and from the model thread, hence the lock.
"""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += 1
        self.sum += value

    def lines(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        out = [
            f'{name}_bucket{{{labels}{sep}le="{_num(b)}"}} {c}'
            for b, c in zip(self.buckets, self.counts, strict=True)
        ]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.total}')
        suffix = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{suffix} {self.sum:.6f}", f"{name}_count{suffix} {self.total}"]
        return out


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    def __init__(self, model: str) -> None:
        self.model = _escape(model)
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency: dict[str, Histogram] = {}
        self.batch_sizes = Histogram(BATCH_BUCKETS)
        self.queue_depth = 0
        self.tokens = 0
        self.images = 0

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(endpoint, status)] += 1
            self.latency.setdefault(endpoint, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def batch(self, size: int) -> None:
        with self.lock:
            self.batch_sizes.observe(size)

    def queue(self, delta: int) -> None:
        with self.lock:
            self.queue_depth += delta

    def generated(self, tokens: int = 0, images: int = 0) -> None:
        with self.lock:
            self.tokens += tokens
            self.images += images

    def render(self) -> str:
        m = f'model="{self.model}"'
        with self.lock:
            lines = [
                "# HELP stillroom_requests_total HTTP requests by endpoint and status code.",
                "# TYPE stillroom_requests_total counter",
            ]
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(
                    f'stillroom_requests_total{{{m},endpoint="{_escape(endpoint)}",status="{status}"}} {n}'
                )
            lines += [
                "# HELP stillroom_request_latency_seconds Time from request to full response.",
                "# TYPE stillroom_request_latency_seconds histogram",
            ]
            for endpoint, hist in sorted(self.latency.items()):
                lines += hist.lines(
                    "stillroom_request_latency_seconds", f'{m},endpoint="{_escape(endpoint)}"'
                )
            lines += [
                "# HELP stillroom_batch_size Items (rows or images) per model batch.",
                "# TYPE stillroom_batch_size histogram",
                *self.batch_sizes.lines("stillroom_batch_size", m),
                "# HELP stillroom_queue_depth Requests waiting for the model.",
                "# TYPE stillroom_queue_depth gauge",
                f"stillroom_queue_depth{{{m}}} {self.queue_depth}",
                "# HELP stillroom_generated_tokens_total Tokens generated.",
                "# TYPE stillroom_generated_tokens_total counter",
                f"stillroom_generated_tokens_total{{{m}}} {self.tokens}",
                "# HELP stillroom_generated_images_total Images generated.",
                "# TYPE stillroom_generated_images_total counter",
                f"stillroom_generated_images_total{{{m}}} {self.images}",
            ]
        return "\n".join(lines) + "\n"
