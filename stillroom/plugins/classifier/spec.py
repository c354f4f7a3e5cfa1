"""What a classifier is on disk: a model directory (``is_classifier_dir``) and the artifact's ``spec``,
what a runtime needs to turn pixels into class probabilities.

Every graph of the family maps a normalised image ``[batch, channels, size, size]`` float32 to class
logits ``[batch, num_classes]``. The spec says how pixels become that image (``normalise``: 8-bit
pixels / 255, then per channel ``(x - mean) / std``) and what the classes are. ``subclasses`` is the
number of outputs per class of the student's head (LELP students: K pseudo-subclasses per class);
the class probability is the sum over a class's subclasses, which the graph and the torch model
already compute (``models.class_logits``), so a runtime reads it for information only.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from stillroom.core.artifact import Manifest, typed_spec
from stillroom.core.errors import StillroomError

KIND = "image-classifier"
TASK = "image-classification"
# models.NETWORKS: ConvClassifier (MnistClassifier is the shipped teacher's name for it), MixerClassifier
ARCHITECTURES = ("ConvClassifier", "MnistClassifier", "MixerClassifier")


def is_classifier_dir(path: Path) -> bool:
    """A directory whose ``config.json`` names one of ``ARCHITECTURES`` (read without importing torch)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("architecture") in ARCHITECTURES
    except (OSError, ValueError, AttributeError):
        return False


class ClassifierSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_classes: PositiveInt
    class_names: list[str]
    subclasses: PositiveInt = 1
    channels: PositiveInt
    image_size: PositiveInt
    mean: list[float] = Field(min_length=1)  # one value, or one per channel
    std: list[float] = Field(min_length=1)

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        """8-bit pixels [B, C, H, W] (or [B, H, W] for one channel) -> the graph's float32 input."""
        x = np.asarray(pixels, dtype=np.float32) / 255.0
        if x.ndim == 3:
            x = x[:, None]
        shape = (self.channels, self.image_size, self.image_size)
        if x.ndim != 4 or x.shape[1:] != shape:
            raise StillroomError(
                f"the classifier takes images of shape {list(shape)}, got pixels {list(np.shape(pixels))}",
                "give images of the size and channels the model was trained on",
            )
        mean = np.asarray(self.mean, dtype=np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(1, -1, 1, 1)
        return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


def spec_of(manifest: Manifest) -> ClassifierSpec:
    return typed_spec(manifest, ClassifierSpec)
