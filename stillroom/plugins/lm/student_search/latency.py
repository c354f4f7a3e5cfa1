"""A candidate's latency, measured on the runtime it ships on, never estimated from FLOPs.

The candidate (random weights: the work of a decode step does not depend on their values) is saved
as a transformers directory, exported with the recipe's own ``export`` options through the family's
exporter (``export_causal_lm``: the graph is validated against torch like any artifact), opened with
ONNX Runtime as ``stillroom bench`` opens it, and timed over a short greedy generation (``prompt``
tokens, then exactly ``new`` tokens, stop tokens ignored) at batch 1: the median of ``repeats``
whole generations after ``warmup``. Results are cached in ``CACHE/<hash>.json`` by the hash of the
model config, the export options and the timing settings, so a resumed or repeated search measures
each shape once.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from stillroom.core.fsio import write_json
from stillroom.plugins.lm.student_search.candidates import config_hash

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Timing:
    """How a candidate is timed (part of the cache key)."""

    runtime: str = "onnxruntime"
    prompt_tokens: int = 16
    new_tokens: int = 16
    warmup: int = 2
    repeats: int = 10
    threads: int | None = None


def measure(model, tokenizer, export_options: dict[str, Any], timing: Timing, cache: Path) -> dict[str, Any]:
    """``{"latency_ms", "per_token_ms", "ttft_ms", "hash", "cached"}`` of ``model`` exported with
    ``export_options`` and timed as ``timing`` says (read from ``cache`` when measured before)."""
    key = config_hash(model.config, {"export": export_options, "timing": asdict(timing)})
    path = Path(cache) / f"{key}.json"
    if path.is_file():
        return {**json.loads(path.read_text(encoding="utf-8")), "cached": True}
    from stillroom.core.bench_plan import BenchSettings
    from stillroom.plugins.lm.bench import time_lm
    from stillroom.plugins.lm.export.onnx_artifact import export_causal_lm
    from stillroom.plugins.lm.runtime import load_onnxruntime

    work = Path(tempfile.mkdtemp(prefix="stillroom-latency-"))
    try:
        model.config.use_cache = True
        model.save_pretrained(work / "model", safe_serialization=True)
        tokenizer.save_pretrained(work / "model")
        art = export_causal_lm(work / "model", work / "artifact", **export_options)
        lm = load_onnxruntime(art.root, intra_op_threads=timing.threads)
        settings = BenchSettings(
            batches=[1],
            warmup=timing.warmup,
            repeats=timing.repeats,
            prompt_tokens=timing.prompt_tokens,
            new_tokens=timing.new_tokens,
        )
        row = time_lm(lm, settings, 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "hash": key,
        "latency_ms": row["latency_ms"]["p50"],
        "per_token_ms": row["per_token_ms"]["p50"],
        "ttft_ms": row["ttft_ms"]["p50"],
        "export": export_options,
        "timing": asdict(timing),
    }
    write_json(path, result)
    log.info("latency %s: %.2f ms", key, result["latency_ms"])
    return {**result, "cached": False}
