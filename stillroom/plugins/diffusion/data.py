"""Image datasets for generator distillation: the shipped MNIST subset and user folders.

Items are ``(image, condition)``: ``image`` is a float tensor [C, H, W] in [-1, 1] (or ``None`` for a
prompt-only source) and ``condition`` a class index (int) or a prompt (str).

Sources:
- ``embedded:mnist``: the class-balanced MNIST subset in ``stillroom/data/mnist/mnist.npz`` (train
  4000 / eval 1000 images; 28x28, zero-padded with black to 32x32 when ``image_size`` is 32);
- a directory of images (png/jpg) with ``captions.jsonl`` lines ``{"file": ..., "prompt": ...}`` or
  ``{"file": ..., "label": int}``; images are resized (bicubic, centre-cropped) to ``image_size``;
- a ``.txt`` file of prompts (one per line): no images, for data-free methods.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stillroom.core.errors import StillroomError
from stillroom.data import resolve

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class MnistImages(torch.utils.data.Dataset):
    """The shipped MNIST subset as ([1, S, S] in [-1, 1], label)."""

    def __init__(self, split: str = "train", image_size: int = 32) -> None:
        if image_size not in (28, 32):
            raise StillroomError(
                f"MNIST images are 28x28 (or padded to 32), not {image_size}",
                "set data.image_size to 28 or 32 to match the teacher",
            )
        path = Path(resolve("embedded:mnist")) / "mnist.npz"
        with np.load(path) as d:
            images, labels = d[f"{split}_images"], d[f"{split}_labels"]
        x = torch.from_numpy(images).float().unsqueeze(1) / 127.5 - 1.0
        if image_size == 32:
            x = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
        self.images, self.labels = x, torch.from_numpy(labels.astype(np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


class ImageFolder(torch.utils.data.Dataset):
    """A folder of images with ``captions.jsonl`` (prompts or labels), loaded into memory."""

    def __init__(self, root: Path, image_size: int, channels: int) -> None:
        from PIL import Image

        index = root / "captions.jsonl"
        if not index.is_file():
            raise StillroomError(
                f"image folder '{root}' has no captions.jsonl",
                'add lines {"file": "a.png", "prompt": "..."} or {"file": ..., "label": 3}',
            )
        self.items: list[tuple[torch.Tensor, Any]] = []
        for n, line in enumerate(index.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                file = root / rec["file"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise StillroomError(
                    f"'{index}' line {n} is not {{\"file\": ..., ...}}", "fix the line"
                ) from err
            cond = rec.get("prompt", rec.get("label"))
            if cond is None:
                raise StillroomError(f"'{index}' line {n} has neither 'prompt' nor 'label'", "add one")
            if not file.is_file():
                raise StillroomError(
                    f"image '{file}' listed in '{index}' does not exist", "fix captions.jsonl"
                )
            with Image.open(file) as img:
                img = img.convert("L" if channels == 1 else "RGB")
                side = min(img.size)
                left, top = (img.width - side) // 2, (img.height - side) // 2
                img = img.crop((left, top, left + side, top + side)).resize(
                    (image_size, image_size), Image.Resampling.BICUBIC
                )
                arr = np.asarray(img, dtype=np.float32)
            x = torch.from_numpy(arr).reshape(image_size, image_size, -1).permute(2, 0, 1) / 127.5 - 1.0
            self.items.append((x, cond))
        if not self.items:
            raise StillroomError(f"image folder '{root}' lists no images", "add lines to captions.jsonl")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


class Prompts(torch.utils.data.Dataset):
    """Prompts only (one per line of a text file)."""

    def __init__(self, path: Path) -> None:
        self.prompts = [p.strip() for p in path.read_text(encoding="utf-8").splitlines() if p.strip()]
        if not self.prompts:
            raise StillroomError(f"prompt file '{path}' is empty", "write one prompt per line")

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> tuple[None, str]:
        return None, self.prompts[i]


def load_image_dataset(source: str, image_size: int, channels: int, split: str = "train"):
    """The dataset named by ``data.source`` (see the module docstring)."""
    if source == "embedded:mnist":
        return MnistImages(split, image_size)
    path = Path(resolve(source)).expanduser()
    if path.is_dir():
        return ImageFolder(path, image_size, channels)
    if path.is_file() and path.suffix == ".txt":
        return Prompts(path)
    raise StillroomError(
        f"data source '{source}' does not exist or is not an image folder / prompt file",
        "use embedded:mnist, a folder with captions.jsonl, or a .txt file of prompts",
    )
