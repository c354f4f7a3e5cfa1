"""Runtime factories as registered with the host: ``factory(target, name=None, **options)``.

Each imports its backend only when called, so listing plugins never imports torch, onnxruntime or
tensorrt.
"""

from __future__ import annotations

from typing import Any


def torch_runtime(target: str, **options: Any):
    """Options: device ("cpu" | "cuda" | "auto"), compile (bool), steps / guidance (diffusion teachers)."""
    from stillroom.serve.torch_runtime import load_torch

    return load_torch(target, **options)


def onnxruntime_runtime(target: str, **options: Any):
    """Options: provider ("auto" | "tensorrt" | "cuda" | "cpu"), allow_fallback, intra/inter_op_threads."""
    from stillroom.serve.onnxruntime_runtime import load_onnxruntime

    return load_onnxruntime(target, **options)


def tensorrt_runtime(target: str, **options: Any):
    """A TensorRT engine artifact (GPU only)."""
    from stillroom.serve.tensorrt_runtime import load_tensorrt

    return load_tensorrt(target, **options)
