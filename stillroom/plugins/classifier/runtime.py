"""How each runtime loads an image classifier: torch (a student or teacher directory), onnxruntime (the
exported graph), tensorrt (its engine).

Every loader returns an ``ImageClassifier``: ``logits(pixels)`` takes 8-bit images and returns class
logits, normalising them as the model's own spec says, so bench sees one object on every runtime and
student and teacher each get the input they were trained on. The torch runtime refuses artifacts (they
hold graphs; their student directory is never read behind their back).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stillroom.core import ort_session, runtime
from stillroom.core.errors import StillroomError
from stillroom.data import resolve
from stillroom.plugins.classifier.spec import KIND, ClassifierSpec, spec_of


@dataclass
class ImageClassifier:
    """``run(images)``: normalised float32 [B, C, H, W] -> class logits [B, num_classes]."""

    name: str
    runtime: str
    run: Callable[[np.ndarray], Any]
    spec: ClassifierSpec
    device: str = "cpu"
    provider: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    kind: str = KIND

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        """Class logits [B, num_classes] (float32) of 8-bit images [B, C, H, W]."""
        return np.asarray(self.run(self.spec.normalise(pixels)), dtype=np.float32)


def load_torch(target: str | Path, device: str = "cpu", compile: bool = False, name: str | None = None):
    """A classifier directory (a student, the teacher, ``embedded:NAME``) in eager or compiled PyTorch."""
    import torch

    from stillroom.plugins.classifier.models import load_classifier

    device = runtime.torch_device(device)
    path = Path(resolve(str(target))).expanduser()
    runtime.refuse_artifact(path)
    model = load_classifier(path).to(device)
    forward = torch.compile(model) if compile else model

    def run(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return forward(torch.from_numpy(images).to(device)).float().cpu().numpy()

    label = name or path.name
    return ImageClassifier(label, "torch", run, model.config.spec(), device, device, {"model": str(target)})


def load_onnxruntime(
    target: str | Path,
    provider: str = "auto",
    allow_fallback: bool = False,
    intra_op_threads: int | None = None,
    inter_op_threads: int | None = None,
    name: str | None = None,
):
    """A classifier artifact (verified through its manifest) on ``provider``."""
    art = runtime.open_artifact(target, "onnx")
    options = ort_session.SessionOptions(
        provider=provider,
        allow_fallback=allow_fallback,
        intra_op_threads=intra_op_threads,
        inter_op_threads=inter_op_threads,
    )
    session, active = ort_session.open_session(art.graph("model"), options)

    def run(images: np.ndarray) -> np.ndarray:
        return ort_session.run(session, {"image": images})[0]

    device = "cuda" if active in ort_session.GPU_PROVIDERS else "cpu"
    info = {"artifact": str(target), "precision": art.manifest.precision}
    label = name or Path(target).name
    return ImageClassifier(label, "onnxruntime", run, spec_of(art.manifest), device, active, info)


def load_tensorrt(target: str | Path, name: str | None = None):
    """A classifier TensorRT engine artifact (GPU only)."""
    from stillroom.core.tensorrt_engine import EngineRunner

    art = runtime.open_artifact(target, "tensorrt")
    runner = EngineRunner(art.graph("model"))

    def run(images: np.ndarray) -> np.ndarray:
        return runner({"image": images})["logits"].float().cpu().numpy()

    info = {"artifact": str(target), "precision": art.manifest.precision}
    label = name or Path(target).name
    return ImageClassifier(label, "tensorrt", run, spec_of(art.manifest), "cuda", "tensorrt", info)


LOADERS = {"torch": load_torch, "onnxruntime": load_onnxruntime, "tensorrt": load_tensorrt}


def load(runtime_name: str, target: str, **options: Any) -> ImageClassifier:
    """``Family.load`` for classifiers."""
    if runtime_name not in LOADERS:
        raise StillroomError(
            f"classifiers have no '{runtime_name}' runtime", f"use one of: {', '.join(LOADERS)}"
        )
    return LOADERS[runtime_name](target, **options)
