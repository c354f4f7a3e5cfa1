"""Generator output to pixels, one rule for every way stillroom hands images out (the HTTP server,
Triton's generate model): [-1, 1] floats -> uint8, rounded half to even, channels last."""

from __future__ import annotations

import numpy as np


def to_pixels(images: np.ndarray) -> np.ndarray:
    """A batch [B, C, H, W] in [-1, 1] as uint8 [B, H, W, C'] (C' = 1 grey, else the first 3, RGB)."""
    channels = 1 if images.shape[1] == 1 else 3
    scaled = (np.asarray(images[:, :channels], dtype=np.float32) + 1.0) * 127.5
    pixels = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(pixels.transpose(0, 2, 3, 1))
