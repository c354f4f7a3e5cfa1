"""Real labelled images to distil from: the shipped MNIST subset (``embedded:mnist``) or any .npz with
``train_images`` / ``train_labels`` / ``eval_images`` / ``eval_labels`` (uint8 [N, H, W] or
[N, C, H, W] and class indices). Images come back as float32 pixels in [0, 1], [N, C, H, W]; the
source's sha256 goes into every dataset card, so a card says exactly which real data it condenses.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from stillroom.core.errors import StillroomError
from stillroom.data import image_npz

DEFAULT = "embedded:mnist"


@dataclass(frozen=True)
class Real:
    """Both splits of a source, its id and sha256."""

    source: str
    sha256: str
    train_images: np.ndarray
    train_labels: np.ndarray
    eval_images: np.ndarray
    eval_labels: np.ndarray

    @property
    def classes(self) -> int:
        return int(self.train_labels.max()) + 1


@lru_cache(maxsize=4)
def load(source: str = DEFAULT) -> Real:
    path = image_npz(source, "dataset source")
    blob = path.read_bytes()
    splits = {}
    with np.load(path) as arrays:
        for split in ("train", "eval"):
            if f"{split}_images" not in arrays or f"{split}_labels" not in arrays:
                raise StillroomError(f"'{path}' has no {split}_images / {split}_labels", "add both splits")
            pixels, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"].astype(np.int64)
            if pixels.dtype != np.uint8 or pixels.ndim not in (3, 4) or len(pixels) != len(labels):
                raise StillroomError(
                    f"'{path}' {split} split: images must be uint8 [N, H, W] or [N, C, H, W], one label each",
                    f"got {pixels.dtype} {list(pixels.shape)} and {len(labels)} labels",
                )
            pixels = pixels[:, None] if pixels.ndim == 3 else pixels
            splits[split] = ((pixels.astype(np.float32) / 255.0), labels)
    return Real(source, hashlib.sha256(blob).hexdigest(), *splits["train"], *splits["eval"])


def per_class_sample(labels: np.ndarray, per_class: int, seed: int, classes: int) -> np.ndarray:
    """Indices of ``per_class`` examples of every class, drawn without replacement with ``seed``,
    class by class (the random real subset of the papers' baseline, and real-image initialisation)."""
    rng = np.random.default_rng(seed)
    picks = []
    for c in range(classes):
        pool = np.flatnonzero(labels == c)
        if len(pool) < per_class:
            raise StillroomError(
                f"class {c} has {len(pool)} real images, fewer than the {per_class} asked for",
                "lower method.ipc",
            )
        picks.append(rng.choice(pool, per_class, replace=False))
    return np.concatenate(picks)
