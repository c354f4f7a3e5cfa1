"""Timing statistics and memory of the current process, shared by every family's benchmark.

Latency is wall-clock around one full call (a whole generation, one sampler call) after ``warmup``
untimed calls, repeated ``repeats`` times; we report the median (p50), p90 and p99 by linear
interpolation between order statistics (numpy's default percentile).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = np.asarray(samples_s, dtype=np.float64) * 1000.0
    return {
        "p50": float(np.percentile(ms, 50)),
        "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)),
        "mean": float(ms.mean()),
        "min": float(ms.min()),
    }


def peak_memory() -> dict[str, float | None]:
    """Peak resident set size of this process (and peak CUDA memory when torch used a GPU), in MiB."""
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
    gpu_mb = None
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        gpu_mb = torch.cuda.max_memory_allocated() / 2**20
    return {"peak_rss_mb": rss_mb, "gpu_peak_mb": gpu_mb}


def timing_row(call: Callable[[], Any], batch: int, warmup: int, repeats: int, unit: str) -> dict[str, Any]:
    """One bench timing row of ``call`` (one batch of ``batch`` items): ``warmup`` untimed calls,
    then ``repeats`` timed ones; latency percentiles and items per second at the median."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return {
        "batch": batch,
        "latency_ms": percentiles(times),
        "throughput": batch / float(np.median(times)),
        "throughput_unit": unit,
    }
