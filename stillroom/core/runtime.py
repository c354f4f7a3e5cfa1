"""Helpers every family's runtime loaders share: devices, opening an artifact for a runtime."""

from __future__ import annotations

from pathlib import Path

from stillroom.core import artifact as artifacts
from stillroom.core.errors import StillroomError

HINTS = {
    "onnx": "use --runtime tensorrt for TensorRT engines",
    "tensorrt": "export with --to tensorrt, or use --runtime onnxruntime",
}


def torch_device(name: str) -> str:
    """``auto`` -> cuda when a GPU is visible, else cpu; CUDA asked for without a GPU is an error."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise StillroomError("the torch runtime was asked for CUDA but no GPU is visible", "use --device cpu")
    return name


def open_artifact(target: str | Path, format: str) -> artifacts.Artifact:
    """The verified artifact at ``target``, which must hold ``format`` graphs (onnx, tensorrt)."""
    art = artifacts.load(target)
    if art.manifest.format != format:
        raise StillroomError(
            f"artifact '{target}' is '{art.manifest.format}', not {format}", HINTS.get(format, "re-export it")
        )
    return art


def refuse_artifact(path: Path) -> None:
    """The torch runtime runs PyTorch models; an ONNX / TensorRT artifact holds graphs (and no run
    folder is read behind its back), so pointing it at one is a one-line error."""
    if is_artifact(path):
        raise StillroomError(
            f"'{path}' is an exported artifact; the torch runtime runs a PyTorch model directory",
            "give the student directory (RUN/student) to --runtime torch, or bench the artifact "
            "with --runtime onnxruntime",
        )


def is_artifact(path: Path) -> bool:
    return (Path(path) / artifacts.MANIFEST).is_file()
