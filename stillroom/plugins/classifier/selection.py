"""The classifier methods' side of data selection (``stillroom.core.selection.Selectable``).

The pool is the training split of ``data.source``. Selectors read the class probabilities and the
embeddings (the head's input) of the teacher and of the current student on it; the teacher runs once
per pool image, however often a selector asks (its outputs are kept). ``use_selection`` makes the
selected images (and the mixed ones a selection asks for: ``mix_statistics``) the method's training
data, with the teacher's targets computed on them alone: a run
with ``data.select`` never runs the teacher on an image no selector asked about and no step trains on.
The weight a selector may give the teacher's term is the methods' ``alpha``.
"""

from __future__ import annotations

import numpy as np
import torch

from stillroom.core.selection import Selectable, Selection
from stillroom.plugins.classifier import metrics

BATCH = 500  # images per forward


def mix_statistics(x: torch.Tensor, y: torch.Tensor, lam: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """KD3's MixDistribution on images [N, C, H, W]: x with its per-channel mean and standard deviation
    replaced by lam-mixtures of its own and y's,
        mu = lam mu(x) + (1 - lam) mu(y),  sigma = lam sigma(x) + (1 - lam) sigma(y),
        x' = sigma (x - mu(x)) / sigma(x) + mu."""
    lam = lam.to(x.dtype)[:, None, None, None]
    mu_x, mu_y = x.mean((2, 3), keepdim=True), y.mean((2, 3), keepdim=True)
    sd_x, sd_y = x.std((2, 3), keepdim=True) + eps, y.std((2, 3), keepdim=True) + eps
    return (lam * sd_x + (1 - lam) * sd_y) * (x - mu_x) / sd_x + lam * mu_x + (1 - lam) * mu_y


class ClassifierSelection(Selectable):
    """Mixed into ``ClassifierMethod``; reads its ``pool`` (images, labels), ``teacher``, ``student``."""

    teacher_weight_param = "alpha"

    def start_pool(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """The training split (normalised images, labels) that selectors choose from."""
        self.pool = (images, labels)
        self.teacher_seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def pool_size(self) -> int:
        return len(self.pool[1])

    def predict(self, role: str, index: np.ndarray) -> np.ndarray:
        logits = self._teacher(index)[0] if role == "teacher" else self._student(index, "logits")
        return metrics.softmax(logits.numpy())

    def embed(self, role: str, index: np.ndarray) -> np.ndarray:
        features = self._teacher(index)[1] if role == "teacher" else self._student(index, "features")
        return features.numpy()

    def pool_labels(self, index: np.ndarray) -> np.ndarray:
        return self.pool[1][torch.from_numpy(index)].numpy()

    def use_selection(self, selection: Selection) -> None:
        images, labels = self.pool
        index = torch.from_numpy(selection.indices)
        self.images, self.labels = images[index], labels[index]
        if selection.mixes is not None:
            first, second, lam = (torch.from_numpy(a) for a in selection.mixes)
            self.images = torch.cat([self.images, mix_statistics(images[first], images[second], lam)])
            self.labels = torch.cat([self.labels, labels[first]])
        self.targets = None
        if self.needs_teacher:
            logits, features = self._teacher(selection.indices)
            if selection.mixes is not None:  # new images: the teacher runs on them once
                mixed = self.teacher_outputs(self.images[len(index) :])
                logits, features = torch.cat([logits, mixed[0]]), torch.cat([features, mixed[1]])
            self.targets = self.teacher_targets(logits, features).float()

    def _teacher(self, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's (logits, embeddings) on pool images, float64; each image is run once."""
        seen = self.teacher_seen
        missing = [i for i in dict.fromkeys(index.tolist()) if i not in seen]
        if missing:
            logits, features = self.teacher_outputs(self.pool[0][torch.tensor(missing)])
            seen.update(zip(missing, zip(logits, features, strict=True), strict=True))
        rows = [seen[i] for i in index.tolist()]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    @torch.no_grad()
    def _student(self, index: np.ndarray, output: str) -> torch.Tensor:
        """The current student's class logits or embeddings on pool images (eval mode), float64."""
        student, device = self.student, self.ctx.device
        was_training = student.training
        student.eval()
        forward = student if output == "logits" else student.features
        chunks = torch.split(self.pool[0][torch.from_numpy(index)], BATCH)
        out = torch.cat([forward(c.to(device)).double().cpu() for c in chunks])
        student.train(was_training)
        return out
