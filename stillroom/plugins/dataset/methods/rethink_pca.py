"""Prune, Combine, Augment (Zhang, Du, Liu, Zhou, Tsang et al. 2025, "Rethinking Large-scale Dataset
Compression: Shifting Focus From Labels to Images"): real images, selected and combined, with hard labels.

1. Prune by difficulty. A scoring ConvNet (the trainable ``student`` role, trained by the trainer for
   ``train.steps`` with cross-entropy and DSA on the real training split) scores every real image x_i
   by its loss, d_i = CE(f(x_i), y_i). Per class only the easiest fraction ``keep_ratio`` (lowest d_i)
   stays in the pool: at small budgets easy, prototypical images carry the most.
2. Combine. Each distilled image is a ``factor`` x ``factor`` grid of pool images of one class, each
   downscaled by ``factor`` (area interpolation), so IPC images hold ipc * factor^2 real ones;
   ``factor = 1`` keeps whole images. Images are drawn from the pool without replacement, seeded.
3. Augment. The students trained on the result see DSA augmentation: the benchmark's protocol.

Labels are hard (one int64 class per image): the paper's point is that the images, not soft labels,
carry the compression.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field, PositiveInt
from torch.nn import functional as F

from stillroom.core.errors import StillroomError
from stillroom.core.method import Role, StepOutput
from stillroom.plugins.dataset.base import DatasetMethod, DatasetParams
from stillroom.plugins.dataset.convnet import STRATEGY, augment, classification_loss
from stillroom.plugins.dataset.experts import network


class PCAParams(DatasetParams):
    keep_ratio: float = Field(0.5, gt=0, le=1, description="easiest fraction of each class kept by pruning")
    factor: PositiveInt = Field(1, description="real images per side of one combined image (1: whole images)")
    scorer_width: PositiveInt = Field(32, description="ConvNet width of the scoring network")
    augment: str = Field(STRATEGY, description="DSA strategy while training the scorer")


def difficulty(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """d_i = CE(f(x_i), y_i) of every image, without augmentation."""
    with torch.no_grad():
        logits = torch.cat([net(chunk) for chunk in torch.split(images, 500)])
    return F.cross_entropy(logits, labels, reduction="none")


def prune(scores: np.ndarray, labels: np.ndarray, keep_ratio: float, classes: int) -> np.ndarray:
    """Indices of the easiest ``keep_ratio`` of each class (lowest difficulty first)."""
    kept = []
    for c in range(classes):
        members = np.flatnonzero(labels == c)
        order = members[np.argsort(scores[members], kind="stable")]
        kept.append(order[: max(1, int(round(keep_ratio * len(members))))])
    return np.concatenate(kept)


def combine(images: torch.Tensor, factor: int) -> torch.Tensor:
    """[G * factor^2, C, H, W] -> [G, C, H, W]: each group's images downscaled and tiled row by row."""
    if factor == 1:
        return images
    n, c, h, w = images.shape
    small = F.interpolate(images, size=(h // factor, w // factor), mode="area")
    tiles = small.view(n // factor**2, factor, factor, c, h // factor, w // factor)
    grid = tiles.permute(0, 3, 1, 4, 2, 5).reshape(
        n // factor**2, c, factor * (h // factor), factor * (w // factor)
    )
    return F.pad(grid, (0, w - grid.shape[-1], 0, h - grid.shape[-2]))


class RethinkPCA(DatasetMethod):
    name = "rethink_pca"
    description = "prune real images by difficulty (keep the easiest), combine patches, hard labels"
    paper = (
        "Zhang et al. 2025, Rethinking Large-scale Dataset Compression: Shifting Focus From Labels to Images"
    )
    Params = PCAParams

    def build_roles(self) -> dict[str, Role]:
        real = self.real
        self.images = torch.from_numpy(real.train_images)
        self.labels = torch.from_numpy(real.train_labels)
        self.scorer = network(real, self.params.scorer_width, 3).to(self.ctx.device)
        return {"student": Role(self.scorer)}

    def dataset(self) -> range:
        return range(len(self.labels))

    def collate(self, items: list[int]) -> dict[str, torch.Tensor]:
        index = torch.tensor(items, dtype=torch.long)
        return {
            "images": self.images[index].to(self.ctx.device),
            "labels": self.labels[index].to(self.ctx.device),
        }

    def loss(self, role: str, batch, step: int) -> StepOutput:
        gen = torch.Generator().manual_seed(int(torch.randint(2**62, (1,))))
        logits = self.scorer(augment(batch["images"], self.params.augment, gen))
        ce = classification_loss(logits, batch["labels"])
        return StepOutput(ce, {"ce": ce.item()})

    def distilled(self) -> tuple[np.ndarray, np.ndarray]:
        p, real = self.params, self.real
        was_training = self.scorer.training
        self.scorer.eval()
        scores = difficulty(self.scorer, self.images.to(self.ctx.device), self.labels.to(self.ctx.device))
        self.scorer.train(was_training)
        pool = prune(scores.cpu().numpy(), real.train_labels, p.keep_ratio, real.classes)
        per_class = p.ipc * p.factor**2
        rng = np.random.default_rng(self.ctx.seed)
        picks = []
        for c in range(real.classes):
            members = pool[real.train_labels[pool] == c]
            if len(members) < per_class:
                raise StillroomError(
                    f"class {c} keeps {len(members)} images after pruning, not ipc * factor^2 = {per_class}",
                    "raise method.keep_ratio or lower method.ipc / method.factor",
                )
            picks.append(rng.choice(members, per_class, replace=False))
        chosen = torch.from_numpy(real.train_images[np.concatenate(picks)])
        images = combine(chosen, p.factor).clamp(0, 1).numpy().astype(np.float32)
        labels = np.repeat(np.arange(real.classes, dtype=np.int64), p.ipc)
        return images, labels
