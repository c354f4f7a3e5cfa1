"""The family's networks: small VGG-style CNNs built from a config, saved as plain directories.

A classifier directory is ``config.json`` (``ClassifierConfig``) + ``model.safetensors`` (+ the
``stillroom.json`` card the trainer writes beside a student). The shipped teacher
``embedded:mnist_classifier`` (``MnistClassifier``: two stages of two 3x3 convs, 32 and 64 channels,
a 128-d embedding) is the same network at its default config, so teacher and students load, run and
export through the same code.

Stage s is ``convs_per_stage`` x (3x3 conv + ReLU) with ``channels[s]`` outputs, then a 2x2 max-pool;
then the embedding ``features = ReLU(fc(flatten))`` and a linear head with ``num_classes x subclasses``
outputs (class-major: output ``c * K + j`` is subclass j of class c). ``forward`` returns class logits:
with K > 1 the log of the summed subclass probabilities (``class_logits``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError
from torch import nn

from stillroom.core.errors import StillroomError
from stillroom.core.fsio import write_bytes, write_json
from stillroom.plugins.classifier.spec import ARCHITECTURES, ClassifierSpec, is_classifier_dir

WEIGHTS = "model.safetensors"


class ClassifierConfig(BaseModel):
    """The network's shape and its input convention; defaults are the shipped MNIST teacher's."""

    model_config = ConfigDict(extra="ignore")  # the teacher's config.json also records its training

    architecture: Literal["ConvClassifier", "MnistClassifier"] = "ConvClassifier"
    channels: list[PositiveInt] = Field([32, 64], min_length=1)
    convs_per_stage: PositiveInt = 2
    feature_dim: PositiveInt = 128
    num_classes: PositiveInt = 10
    subclasses: PositiveInt = 1
    in_channels: PositiveInt = 1
    image_size: PositiveInt = 28
    mean: list[float] = [0.5]  # pixels / 255 -> (x - mean) / std: [-1, 1] for the MNIST teacher
    std: list[float] = [0.5]
    class_names: list[str] | None = None
    dropout: float = Field(0.0, ge=0, lt=1)

    def spec(self) -> ClassifierSpec:
        return ClassifierSpec(
            num_classes=self.num_classes,
            class_names=self.class_names or [str(c) for c in range(self.num_classes)],
            subclasses=self.subclasses,
            channels=self.in_channels,
            image_size=self.image_size,
            mean=self.mean,
            std=self.std,
        )


def class_logits(subclass_logits: torch.Tensor, subclasses: int) -> torch.Tensor:
    """[B, C*K] subclass logits -> [B, C] class logits, log sum_j exp(u_{c,j}).

    softmax of the result is the class probability q(c) = sum_j q(c, j), the sum of the class's
    subclass probabilities; with K = 1 it is the identity.
    """
    if subclasses == 1:
        return subclass_logits
    return subclass_logits.unflatten(-1, (-1, subclasses)).logsumexp(-1)


class ConvClassifier(nn.Module):
    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        side = config.image_size // 2 ** len(config.channels)
        if side < 1:
            raise StillroomError(
                f"{len(config.channels)} pooling stages leave nothing of a {config.image_size}px image",
                "use fewer entries in student.channels",
            )
        layers: list[nn.Module] = []
        width = config.in_channels
        for out in config.channels:
            for _ in range(config.convs_per_stage):
                layers += [nn.Conv2d(width, out, 3, padding=1), nn.ReLU()]
                width = out
            layers.append(nn.MaxPool2d(2))
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Linear(width * side * side, config.feature_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.feature_dim, config.num_classes * config.subclasses)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The penultimate embedding [B, feature_dim] of normalised images [B, C, H, W]."""
        return torch.relu(self.fc(self.conv(images).flatten(1)))

    def subclass_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The head's outputs [B, num_classes * subclasses]."""
        return self.head(self.dropout(self.features(images)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits [B, num_classes]."""
        return class_logits(self.subclass_logits(images), self.config.subclasses)


def load_classifier(path: str | Path, role: str = "model") -> ConvClassifier:
    """The classifier saved in ``path`` (config.json + model.safetensors), in eval mode on the CPU."""
    from safetensors.torch import load_file

    root = Path(path)
    if not is_classifier_dir(root) or not (root / WEIGHTS).is_file():
        raise StillroomError(
            f"{role} '{path}' is not a classifier directory",
            f"give a directory with config.json (architecture {' or '.join(ARCHITECTURES)}) and {WEIGHTS}",
        )
    try:
        config = ClassifierConfig.model_validate_json((root / "config.json").read_text(encoding="utf-8"))
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise StillroomError(
            f"{role} '{path}' config.json: {where}: {first['msg']}", "fix config.json"
        ) from None
    model = ConvClassifier(config)
    try:
        model.load_state_dict(load_file(str(root / WEIGHTS), device="cpu"))
    except RuntimeError as err:
        raise StillroomError(
            f"{role} '{path}': {WEIGHTS} does not fit its config.json ({' '.join(str(err).split())[:160]})",
            "save the weights and the config together",
        ) from None
    return model.eval()


def save_classifier(model: ConvClassifier, out_dir: Path) -> None:
    from safetensors.torch import save

    out_dir = Path(out_dir)
    write_json(out_dir / "config.json", model.config.model_dump(mode="json"))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_bytes(out_dir / WEIGHTS, save(state))
