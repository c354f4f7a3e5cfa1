"""Labelled images for classifier distillation: the shipped MNIST subset, or any .npz of the same layout.

A source holds two splits, ``train`` (what students learn from) and ``eval`` (held out: training
evaluation, export validation and ``stillroom bench`` score on it), as arrays

    {split}_images  uint8 [N, H, W] or [N, C, H, W]   8-bit pixels
    {split}_labels  int   [N]                           class indices

``embedded:mnist`` is ``stillroom/data/mnist/mnist.npz`` (4000 train / 1000 eval digits, 28x28, class
balanced; the shipped MNIST classifier never saw its eval split). Any other source is a path to an
.npz file with those four arrays.
"""

from __future__ import annotations

import numpy as np

from stillroom.core.errors import StillroomError
from stillroom.data import image_npz

DEFAULT = "embedded:mnist"
SPLITS = ("train", "eval")


def load_split(source: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(pixels uint8 [N, C, H, W], labels int64 [N]) of one split of ``source``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = image_npz(source, "classifier data source")
    with np.load(path) as arrays:
        missing = [k for k in (f"{split}_images", f"{split}_labels") if k not in arrays]
        if missing:
            raise StillroomError(
                f"'{path}' has no array {missing[0]}", f"add {split}_images and {split}_labels"
            )
        pixels, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"].astype(np.int64)
    if pixels.dtype != np.uint8 or pixels.ndim not in (3, 4) or len(pixels) != len(labels) or not len(labels):
        raise StillroomError(
            f"'{path}' {split} split: images must be uint8 [N, H, W] or [N, C, H, W] with one label each",
            f"got {pixels.dtype} {list(pixels.shape)} and {len(labels)} labels",
        )
    return (pixels[:, None] if pixels.ndim == 3 else pixels), labels
