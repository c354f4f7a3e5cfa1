"""Where an artifact came from: library versions (also in every run.json) and the run's recipe facts.

``record`` is called at export time, while the student directory is at hand; what it returns is
stored in the manifest and the artifact never reads the student directory again.
"""

from __future__ import annotations

import hashlib
import json
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from stillroom.core.artifact import Provenance

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


def student_card(model_dir: Path | None) -> dict[str, Any]:
    """The ``stillroom.json`` the trainer wrote beside a student ({} for any other model directory)."""
    card = Path(model_dir) / "stillroom.json" if model_dir else None
    if card is None or not card.is_file():
        return {}
    try:
        return json.loads(card.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def record(source: dict[str, Any], model_dir: Path | None = None) -> Provenance:
    """The manifest's provenance: ``source`` (what export was pointed at) plus, for a distilled
    student, its recipe's method, teacher, data and hash from the student card in ``model_dir``."""
    recipe = student_card(model_dir).get("recipe") or {}
    canonical = json.dumps(recipe, sort_keys=True, separators=(",", ":"))
    return Provenance(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        method=source.get("method") or (recipe.get("method") or {}).get("name"),
        teacher=(recipe.get("teacher") or {}).get("path"),
        data=(recipe.get("data") or {}).get("source"),
        recipe_sha256=hashlib.sha256(canonical.encode()).hexdigest() if recipe else None,
        train_steps=source.get("steps"),
        source=dict(source),
        versions=versions(),
    )
