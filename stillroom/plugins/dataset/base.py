"""What every dataset distillation method shares: the ``data`` section, IPC and the evaluation
protocol, the real data, CPU accounting, evaluation and writing the artifact.

A method's trainable ``student`` role is whatever it optimises (the synthetic images and learnable lr
for MTT; a scoring network for rethink_pca), so the trainer's checkpoints, resume, progress bar and
logs work unchanged. A method implements ``build_roles`` (roles, using ``self.real``), ``dataset`` /
``collate`` / ``loss``, and ``distilled()``: the images float32 [N, C, H, W] in [0, 1] and labels
(int64 [N] or float32 [N, K]) as they stand. The base evaluates them with the card's protocol at the
end of training and writes them as the run's output folder (``artifact.write``), which is the
artifact: nothing is exported.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, PositiveInt

from stillroom.core.method import Method, Params, Role
from stillroom.plugins.dataset import artifact, bench, data
from stillroom.plugins.dataset.convnet import Protocol


class DatasetData(Params):
    source: str = Field(
        data.DEFAULT, description="embedded:mnist or an .npz with train_/eval_ images, labels"
    )


class DatasetParams(Params):
    """Base of a dataset method's ``method:`` section."""

    ipc: PositiveInt = Field(10, description="images per class of the distilled dataset")
    eval: Protocol = Field(default_factory=Protocol, description="how the card's accuracy is measured")


class DatasetMethod(Method):
    family = "dataset"
    Data = DatasetData
    Params = DatasetParams

    def build(self) -> dict[str, Role]:
        self.real = data.load(self.recipe.data.source)
        self._cpu_before, self._cpu_start, self._eval_cpu = 0.0, time.process_time(), 0.0
        self.extra_card: dict[str, Any] = {}
        self.evaluation: dict[str, Any] = {}
        roles = self.build_roles()
        self._cpu_start = time.process_time()  # cached or freshly trained helpers (experts) are not synthesis
        return roles

    def build_roles(self) -> dict[str, Role]:
        raise NotImplementedError(f"method {self.name!r} must implement build_roles()")

    def distilled(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError(f"method {self.name!r} must implement distilled()")

    # -- CPU accounting, carried across resumes in the checkpoint's method state ----------------------
    def cpu_seconds(self) -> float:
        return self._cpu_before + time.process_time() - self._cpu_start - self._eval_cpu

    def state_dict(self) -> dict[str, Any]:
        return {"cpu_s": self.cpu_seconds()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._cpu_before, self._cpu_start, self._eval_cpu = state.get("cpu_s", 0.0), time.process_time(), 0.0

    # -- results ------------------------------------------------------------------------------------
    def evaluate(self, student: torch.nn.Module) -> dict[str, float]:
        """Accuracy (mean +- std over the protocol's seeds) of fresh ConvNets trained on ``distilled()``."""
        started = time.process_time()
        images, labels = self.distilled()
        p = self.params.eval
        accuracies, _ = bench.scores(
            images, labels, artifact.data_sha256(images, labels), self.real, p, p.epochs
        )
        self.evaluation = bench.figures(accuracies)
        self._eval_cpu += time.process_time() - started
        return {"accuracy": self.evaluation["accuracy"], "accuracy_std": self.evaluation["accuracy_std"]}

    def save_student(self, student: torch.nn.Module, out_dir: Path) -> None:
        images, labels = self.distilled()
        card = {
            "method": self.name,
            "paper": self.paper,
            "ipc": self.params.ipc,
            "classes": self.real.classes,
            "source": {"id": self.real.source, "sha256": self.real.sha256},
            "seed": self.ctx.seed,
            "cpu_minutes": round(self.cpu_seconds() / 60, 3),
            **self.extra_card,
            "params": self.params.model_dump(mode="json", exclude={"eval"}),
            "protocol": self.params.eval.model_dump(mode="json"),
            "evaluation": self.evaluation,
        }
        artifact.write(out_dir, images, labels, card)
