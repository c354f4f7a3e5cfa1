"""One benchmark target, measured in a fresh process: ``python -m stillroom.serve.bench_worker JOB.json``.

Loads the target through its registered runtime (timing the load), times every batch size, then
gathers quality: for LMs held-out perplexity, argmax predictions (for agreement with the teacher,
computed by the parent) and greedy continuations; for generators the image metrics of
``stillroom.core.image_metrics`` on seeded noise and a sample grid. Writes ``result.json`` (and
``argmax.npy`` / ``grid.npy``) into the job's directory; a user error becomes ``{"error": ...}``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from stillroom.core.errors import StillroomError
from stillroom.core.fsio import write_json
from stillroom.serve import bench_measure as measure
from stillroom.serve.bench_plan import BenchSettings, Target

log = logging.getLogger(__name__)


def _heldout_blocks(model, text: str, settings: BenchSettings) -> np.ndarray:
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    n = min(settings.eval_blocks, len(ids) // settings.eval_seq_len)
    if n < 1:
        raise StillroomError(
            f"the held-out text has {len(ids)} tokens, fewer than one block of {settings.eval_seq_len}",
            "give more evaluation text or lower eval_seq_len",
        )
    return np.asarray(ids[: n * settings.eval_seq_len], dtype=np.int64).reshape(n, settings.eval_seq_len)


def _fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def _lm(model, job: dict[str, Any], settings: BenchSettings, out: Path) -> dict[str, Any]:
    timing = [measure.time_lm(model, settings, b) for b in settings.batches]
    blocks = _heldout_blocks(model, Path(job["heldout"]).read_text(encoding="utf-8"), settings)
    quality = measure.lm_quality_inputs(model, blocks, settings)
    np.save(out / "argmax.npy", quality.pop("argmax"))
    continuations = quality.pop("continuations")
    return {
        "timing": timing,
        "quality": quality,
        "continuations": continuations,
        "tokenizer": _fingerprint(model.tokenizer),
    }


def _generator(model, settings: BenchSettings, out: Path) -> dict[str, Any]:
    timing = [measure.time_generator(model, settings, b) for b in settings.batches]
    n = settings.quality_samples
    noise = model.noise(n, settings.seed + 1)
    labels = (np.arange(n) % model.num_classes) if model.conditioning == "class" else None
    images = measure.generate_quality_images(model, noise, labels, max(settings.batches))
    np.save(out / "grid.npy", images[: settings.grid_images].astype(np.float32))
    quality: dict[str, Any] = {"samples": n}
    channels, h, w = model.image_shape
    if labels is not None and channels == 1 and (h, w) in ((28, 28), (32, 32)):
        import torch

        from stillroom.core.image_metrics import evaluate_images

        try:
            quality.update(evaluate_images(torch.from_numpy(images), torch.from_numpy(labels)))
        except ValueError as err:  # e.g. too few samples per class for recall: report, do not fail the run
            quality["error"] = str(err)
    else:
        quality["note"] = "image metrics need class-conditional 1x28x28 (MNIST-scale) images"
    return {"timing": timing, "quality": quality}


def run_job(job_path: Path) -> int:
    job = json.loads(Path(job_path).read_text())
    out = Path(job_path).parent
    target, settings = Target(**job["target"]), BenchSettings(**job["settings"])
    from stillroom.core.host import get_host

    try:
        factory = get_host().runtime(target.runtime)
        start = time.perf_counter()
        model = factory(target.spec, name=target.name, **target.options)
        load_s = time.perf_counter() - start
        result: dict[str, Any] = {
            "kind": model.kind,
            "load_s": load_s,
            "provider": model.provider,
            "device": model.device,
        }
        result.update(
            _lm(model, job, settings, out) if model.kind == "causal-lm" else _generator(model, settings, out)
        )
        result.update(measure.peak_memory())
    except StillroomError as err:
        write_json(out / "result.json", {"error": str(err)})
        return 1
    write_json(out / "result.json", result)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(run_job(Path(sys.argv[1])))
