"""What ``stillroom bench`` measures for a few-step generator, in the benchmark's fresh process.

Latency of one sampler call per batch size; quality from ``quality_samples`` images on seeded noise
(the same noise and labels for every model) scored with the family's image metrics, and a grid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from stillroom.core.bench_plan import BenchSettings
from stillroom.core.measure import timing_row
from stillroom.plugins.diffusion.runtime import ImageGenerator


def time_generator(model: ImageGenerator, settings: BenchSettings, batch: int) -> dict[str, Any]:
    noise = model.noise(batch, settings.seed)
    labels = (np.arange(batch) % model.num_classes) if model.conditioning == "class" else None
    states = model.encode(["a photo"] * batch) if model.conditioning == "text" and model.encode else None
    return timing_row(
        lambda: model.generate(noise, class_labels=labels, encoder_hidden_states=states),
        batch,
        settings.warmup,
        settings.repeats,
        "images/s",
    )


def generate_quality_images(
    model: ImageGenerator, noise: np.ndarray, labels: np.ndarray | None, chunk: int
) -> np.ndarray:
    """The images scored for quality: the same noise and labels for every model, in chunks."""
    out = []
    for start in range(0, noise.shape[0], chunk):
        lab = labels[start : start + chunk] if labels is not None else None
        out.append(model.generate(noise[start : start + chunk], class_labels=lab))
    return np.concatenate(out)


def bench(model, job: dict[str, Any], settings: BenchSettings, out: Path) -> dict[str, Any]:
    """``Family.bench``: one timing row per batch size."""
    return {"timing": [time_generator(model, settings, b) for b in settings.batches]}


def fid_like(model, job: dict[str, Any], settings: BenchSettings, out: Path) -> dict[str, Any]:
    """The ``fid_like`` metric: ``quality_samples`` images from seeded noise (the same for every
    model) scored by ``metrics.evaluate_images`` (FID-like, class accuracy, diversity, recall), and a
    sample grid (``grid.npy``)."""
    n = settings.quality_samples
    noise = model.noise(n, settings.seed + 1)
    labels = (np.arange(n) % model.num_classes) if model.conditioning == "class" else None
    images = generate_quality_images(model, noise, labels, max(settings.batches))
    np.save(out / "grid.npy", images[: settings.grid_images].astype(np.float32))
    quality: dict[str, Any] = {"samples": n}
    channels, h, w = model.image_shape
    if labels is not None and channels == 1 and (h, w) in ((28, 28), (32, 32)):
        import torch

        from stillroom.plugins.diffusion.metrics import evaluate_images

        try:
            quality.update(evaluate_images(torch.from_numpy(images), torch.from_numpy(labels)))
        except ValueError as err:  # e.g. too few samples per class for recall: report, do not fail the run
            quality["error"] = str(err)
    else:
        quality["note"] = "image metrics need class-conditional 1x28x28 (MNIST-scale) images"
    return {"quality": quality}
