"""What ``stillroom bench`` measures for an image classifier.

In the parent process, once (``bench_inputs``): the held-out split of the student's training data
(the manifest's ``provenance.data``, else ``embedded:mnist``), written where every target reads it.
In each target's process: latency of one ``logits`` call per batch size (``bench``), and the
``accuracy`` metric: top-1 accuracy and expected calibration error on the first ``quality_samples``
held-out images, whose predicted classes are saved as ``argmax.npy``. After (``compare``): the
student's top-1 agreement with its teacher on those images.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from stillroom.core.artifact import read_manifest
from stillroom.core.bench_plan import BenchSettings
from stillroom.core.errors import StillroomError
from stillroom.core.measure import timing_row
from stillroom.plugins.classifier import data, metrics
from stillroom.plugins.classifier.runtime import ImageClassifier

log = logging.getLogger(__name__)
CHUNK = 256  # images per call when a whole set is scored


def bench_inputs(artifact_dir: Path | None, workdir: Path) -> dict[str, Any]:
    """``{"heldout": path}``: the held-out pixels and labels as ``workdir/heldout.npz``."""
    source = data.DEFAULT
    if artifact_dir is not None:
        source = read_manifest(Path(artifact_dir)).provenance.data or data.DEFAULT
    try:
        pixels, labels = data.load_split(source, "eval")
    except StillroomError as err:
        log.warning("%s; scoring on %s instead", err, data.DEFAULT)
        pixels, labels = data.load_split(data.DEFAULT, "eval")
    path = Path(workdir) / "heldout.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, pixels=pixels, labels=labels)
    return {"heldout": str(path)}


def heldout(job: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    with np.load(job["heldout"]) as arrays:
        return arrays["pixels"], arrays["labels"]


def time_classifier(model: ImageClassifier, pixels: np.ndarray, settings: BenchSettings, batch: int):
    images = np.resize(pixels, (batch, *pixels.shape[1:]))  # the held-out images, repeated if too few
    return timing_row(lambda: model.logits(images), batch, settings.warmup, settings.repeats, "images/s")


def bench(model: ImageClassifier, job: dict[str, Any], settings: BenchSettings, out: Path) -> dict[str, Any]:
    """``Family.bench``: one timing row per batch size."""
    pixels, _ = heldout(job)
    return {"timing": [time_classifier(model, pixels, settings, b) for b in settings.batches]}


def accuracy(
    model: ImageClassifier, job: dict[str, Any], settings: BenchSettings, out: Path
) -> dict[str, Any]:
    """The ``accuracy`` metric: accuracy and ECE on the first ``quality_samples`` held-out images."""
    pixels, labels = heldout(job)
    pixels, labels = pixels[: settings.quality_samples], labels[: settings.quality_samples]
    probs = metrics.softmax(
        np.concatenate([model.logits(pixels[i : i + CHUNK]) for i in range(0, len(labels), CHUNK)])
    )
    np.save(out / "argmax.npy", probs.argmax(-1))
    return {
        "quality": {
            "accuracy": metrics.accuracy(probs, labels),
            "ece": metrics.expected_calibration_error(probs, labels),
            "samples": len(labels),
        }
    }


def compare(teacher: dict[str, Any], student: dict[str, Any]) -> dict[str, Any]:
    """``{"top1_agreement": ...}`` on the images both scored; {} without both predictions."""
    paths = [(r.get("arrays") or {}).get("argmax") for r in (teacher, student)]
    if not all(paths):
        return {}
    a, b = (np.load(p) for p in paths)
    n = min(len(a), len(b))
    return {"top1_agreement": metrics.top1_agreement(a[:n], b[:n])}
