"""A distilled dataset on disk: the output of every ``dataset`` method and what its benchmark reads.

    DATASET/data.npz   images float32 [N, C, H, W] in pixel space [0, 1] (not normalised);
                       labels int64 [N] (hard) or float32 [N, K] (soft, rows sum to 1)
    DATASET/grid.png   the images, one row per class (for people)
    DATASET/card.json  what it is: method, ipc, classes, source id and sha256, seed, CPU minutes,
                       the evaluation protocol and its figures; written last

Each file is written atomically (``core.fsio``) and the card last, so a folder with a card is
complete. The folder is self-contained: bench and inspect read nothing else.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from stillroom.core.errors import StillroomError
from stillroom.core.fsio import write_bytes, write_json

KIND = "distilled-dataset"
DATA, GRID, CARD = "data.npz", "grid.png", "card.json"


def is_dataset_dir(path: Path) -> bool:
    path = Path(path)
    if not (path / CARD).is_file() or not (path / DATA).is_file():
        return False
    try:
        return json.loads((path / CARD).read_text(encoding="utf-8")).get("kind") == KIND
    except (OSError, ValueError):
        return False


def check(images: np.ndarray, labels: np.ndarray) -> None:
    if images.dtype != np.float32 or images.ndim != 4 or images.min() < 0 or images.max() > 1:
        raise ValueError(f"images must be float32 [N, C, H, W] in [0, 1], got {images.dtype} {images.shape}")
    hard = labels.dtype == np.int64 and labels.ndim == 1
    soft = labels.dtype == np.float32 and labels.ndim == 2
    if not (hard or soft) or len(labels) != len(images):
        raise ValueError(f"labels must be int64 [N] or float32 [N, K], got {labels.dtype} {labels.shape}")


def data_sha256(images: np.ndarray, labels: np.ndarray) -> str:
    """Identity of a dataset's content (what evaluation results are cached under)."""
    digest = hashlib.sha256()
    for array in (images, labels):
        digest.update(str((array.dtype, array.shape)).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def write(out: Path, images: np.ndarray, labels: np.ndarray, card: dict[str, Any]) -> None:
    """Writes data.npz, grid.png, then card.json (with kind, counts and the data's sha256) into ``out``."""
    check(images, labels)
    out = Path(out)
    buffer = io.BytesIO()
    np.savez(buffer, images=images, labels=labels)
    write_bytes(out / DATA, buffer.getvalue())
    write_bytes(out / GRID, grid_png(images, labels))
    shape = list(images.shape[1:])
    facts = {"kind": KIND, "images": len(images), "image_shape": shape, "soft_labels": labels.ndim == 2}
    write_json(out / CARD, {**facts, **card, "data_sha256": data_sha256(images, labels)})


def read(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(images, labels, card) of a dataset folder, checked against the card's sha256."""
    path = Path(path)
    if not is_dataset_dir(path):
        raise StillroomError(
            f"'{path}' is not a distilled dataset (no {CARD} of kind {KIND} beside {DATA})",
            "give the folder `stillroom run` wrote for a dataset recipe (RUN/student)",
        )
    try:
        card = json.loads((path / CARD).read_text(encoding="utf-8"))
        with np.load(path / DATA) as arrays:
            images, labels = arrays["images"], arrays["labels"]
        check(images, labels)
    except (OSError, ValueError, KeyError) as err:
        raise StillroomError(
            f"dataset '{path}' is damaged: {err}", "re-create it with `stillroom run`"
        ) from err
    if data_sha256(images, labels) != card.get("data_sha256"):
        raise StillroomError(f"dataset '{path}': {DATA} does not match its card", "re-create it")
    return images, labels, card


def grid_png(images: np.ndarray, labels: np.ndarray) -> bytes:
    """One row per class (its images left to right), 8-bit PNG bytes."""
    from PIL import Image

    classes = labels.argmax(-1) if labels.ndim == 2 else labels
    rows = [images[classes == c] for c in np.unique(classes)]
    n, (c, h, w) = max(len(r) for r in rows), images.shape[1:]
    canvas = np.zeros((len(rows) * h, n * w, c), dtype=np.float32)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            canvas[i * h : (i + 1) * h, j * w : (j + 1) * w] = image.transpose(1, 2, 0)
    pixels = (canvas * 255 + 0.5).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if c == 1 else pixels).save(buffer, format="PNG")
    return buffer.getvalue()
