"""Runtime factories as registered with the host: ``factory(target, name=None, **options)``.

A runtime names no family: it asks the host which family owns ``target`` (an artifact by its kind, a
model directory by ``Family.claims``) and that family's ``load`` opens it. Backends are imported only
when a model is loaded, so listing plugins never imports torch, onnxruntime or tensorrt.
"""

from __future__ import annotations

from typing import Any

from stillroom.core.host import get_host


def _load(runtime: str, target: str, options: dict[str, Any]):
    return get_host().family_for_target(str(target)).load(runtime, str(target), **options)


def torch_runtime(target: str, **options: Any):
    """Options: device ("cpu" | "cuda" | "auto"), compile (bool), steps / guidance (diffusion teachers)."""
    return _load("torch", target, options)


def onnxruntime_runtime(target: str, **options: Any):
    """Options: provider ("auto" | "tensorrt" | "cuda" | "cpu"), allow_fallback, intra/inter_op_threads."""
    return _load("onnxruntime", target, options)


def tensorrt_runtime(target: str, **options: Any):
    """A TensorRT engine artifact (GPU only)."""
    return _load("tensorrt", target, options)
