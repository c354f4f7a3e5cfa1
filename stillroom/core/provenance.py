"""Library versions recorded in every run.json and every artifact manifest (what made this file)."""

from __future__ import annotations

import platform
from importlib import metadata

LIBRARIES = ("stillroom", "torch", "transformers", "diffusers", "onnx", "onnxruntime", "onnxscript")


def versions() -> dict[str, str]:
    """Python's version and that of each installed library of ``LIBRARIES`` (missing ones are left out)."""
    out = {"python": platform.python_version()}
    for dist in LIBRARIES:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out
