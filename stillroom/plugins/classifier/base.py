"""What every classifier distillation method shares: teacher/student/data sections, the student built
from its config, the training split with the teacher's outputs on it, evaluation and saving.

The training images are fixed (no augmentation), so the teacher is run over the training split once
when the run starts and its outputs are kept beside the images: a step then costs only the student's
forward and backward. A method turns those outputs into the per-example targets it distils towards
(``teacher_targets``: the teacher's logits for KD, pseudo-subclass logits for LELP); a batch is

    {"images": [B, C, H, W] normalised, "labels": [B], "targets": [B, T] | absent}
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from pydantic import Field, PositiveInt

from stillroom.core.errors import StillroomError
from stillroom.core.method import Method, Params, Role
from stillroom.data import locate
from stillroom.plugins.classifier import data, metrics, models
from stillroom.plugins.classifier.selection import ClassifierSelection

BATCH = 500  # images per forward when a whole split goes through a model


class ClassifierTeacher(Params):
    path: str = Field(
        "embedded:mnist_classifier", description="classifier directory (config.json + model.safetensors)"
    )


class ClassifierStudent(Params):
    channels: list[PositiveInt] = Field(
        [16, 32], min_length=1, description="output channels of each conv stage (each ends in a 2x2 max-pool)"
    )
    convs_per_stage: PositiveInt = Field(1, description="3x3 conv + ReLU layers per stage")
    feature_dim: PositiveInt = Field(64, description="width of the penultimate (embedding) layer")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout before the head while training")


class ClassifierData(Params):
    source: str = Field(
        data.DEFAULT, description="embedded:mnist or an .npz with train_/eval_ images, labels"
    )


class ClassifierMethod(Method, ClassifierSelection):
    """Base of the classifier distillation methods (one trainable role: the student)."""

    family = "classifier"
    architecture = "ConvClassifier"  # the student's network (``models.NETWORKS``)
    Teacher = ClassifierTeacher
    Student = ClassifierStudent
    Data = ClassifierData

    # -- what a method says -----------------------------------------------------------------------
    @property
    def needs_teacher(self) -> bool:
        """False when the objective ignores the teacher (the teacher's outputs are then not computed)."""
        return True

    def subclasses(self) -> int:
        """Outputs of the student's head per class."""
        return 1

    def teacher_targets(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Per-example targets [N, T] from the teacher's logits [N, C] and embeddings [N, D] on the
        training split (in float64); default: the logits."""
        return logits

    # -- set-up -------------------------------------------------------------------------------------
    def build(self) -> dict[str, Role]:
        self.teacher = models.load_classifier(locate(self.recipe.teacher.path, "teacher"), "teacher")
        self.spec = self.teacher.config.spec()
        pixels, labels = self.split("train")
        self.images = torch.from_numpy(self.spec.normalise(pixels))
        self.labels = torch.from_numpy(labels)
        self.targets = None
        self.start_pool(self.images, self.labels)  # data.select trains on a part of it (selection.py)
        if self.needs_teacher and self.recipe.select_name is None:
            logits, features = self.teacher_outputs(self.images)
            self.targets = self.teacher_targets(logits, features).float()
        self.student = models.build_classifier(self.student_config()).to(self.ctx.device)
        return {"student": Role(self.student)}

    def student_config(self) -> models.ClassifierConfig:
        """The student's network: the recipe's ``student`` section with the teacher's classes and input."""
        t = self.teacher.config
        return models.ClassifierConfig(
            architecture=self.architecture,
            num_classes=t.num_classes,
            in_channels=t.in_channels,
            image_size=t.image_size,
            mean=t.mean,
            std=t.std,
            class_names=self.spec.class_names,
            subclasses=self.subclasses(),
            **self.recipe.student.model_dump(),
        )

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """A split of ``data.source``, checked against what the teacher takes."""
        pixels, labels = data.load_split(self.recipe.data.source, name)
        want = (self.spec.channels, self.spec.image_size, self.spec.image_size)
        if pixels.shape[1:] != want:
            raise StillroomError(
                f"data.source '{self.recipe.data.source}' has images {list(pixels.shape[1:])}, "
                f"the teacher takes {list(want)}",
                "give data of the teacher's image size and channels",
            )
        if labels.min() < 0 or labels.max() >= self.spec.num_classes:
            raise StillroomError(
                f"data.source '{self.recipe.data.source}' has labels outside 0..{self.spec.num_classes - 1}",
                "give labels of the teacher's classes",
            )
        return pixels, labels

    @torch.no_grad()
    def teacher_outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's (logits [N, C], embeddings [N, D]) on ``images``, float64 on the CPU."""
        teacher = self.teacher.to(self.ctx.device)
        logits, features = [], []
        for chunk in torch.split(images, BATCH):
            z = teacher.features(chunk.to(self.ctx.device))
            features.append(z.double().cpu())
            logits.append(teacher.head(z).double().cpu())
        teacher.cpu()
        return torch.cat(logits), torch.cat(features)

    # -- data ---------------------------------------------------------------------------------------
    def dataset(self) -> range:
        """Items are indices into the training split held in memory (and into ``targets``)."""
        return range(len(self.labels))

    def collate(self, items: list[int]) -> dict[str, torch.Tensor]:
        index = torch.tensor(items, dtype=torch.long)
        batch = {"images": self.images[index], "labels": self.labels[index]}
        if self.targets is not None:
            batch["targets"] = self.targets[index]
        return {k: v.to(self.ctx.device) for k, v in batch.items()}

    # -- results ------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, student: torch.nn.Module) -> dict[str, float]:
        """Accuracy, ECE and top-1 agreement with the teacher of the student on the held-out split."""
        if not hasattr(self, "heldout"):
            pixels, self.heldout_labels = self.split("eval")
            self.heldout = torch.from_numpy(self.spec.normalise(pixels))
            self.heldout_teacher = self.teacher_outputs(self.heldout)[0].argmax(-1).numpy()
        chunks = torch.split(self.heldout, BATCH)
        probs = metrics.softmax(
            torch.cat([student(c.to(self.ctx.device)).cpu() for c in chunks]).double().numpy()
        )
        return self.scores(probs)

    def scores(self, probs: np.ndarray) -> dict[str, float]:
        """What ``evaluate`` reports of the student's class probabilities [N, C] on the held-out split."""
        return {
            "accuracy": metrics.accuracy(probs, self.heldout_labels),
            "ece": metrics.expected_calibration_error(probs, self.heldout_labels),
            "top1_agreement": metrics.top1_agreement(probs.argmax(-1), self.heldout_teacher),
        }

    def save_student(self, student: torch.nn.Module, out_dir: Path) -> None:
        models.save_classifier(student, out_dir)
