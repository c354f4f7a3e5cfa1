"""What ``stillroom export SRC`` was pointed at: a distill run, an LM directory or a generator student.

- a ``stillroom distill`` run directory (``run.json`` + ``student/``): its student is exported;
- a generator student directory (``stillroom.json`` whose ``sampler`` is set, ``unet/``);
- a transformers causal-LM directory (``config.json``), a stillroom LM student or any plain one.

The manifest's ``source`` records which, with the path and (for runs) the method and step count.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stillroom.core.errors import StillroomError


@dataclass
class Source:
    kind: str  # "causal-lm" | "generator"
    model_dir: Path
    info: dict[str, Any] = field(default_factory=dict)


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StillroomError(
            f"cannot read '{path}': {err}", "the directory is damaged; re-create it"
        ) from err


def check_weights(root: Path) -> None:
    """Opens the header of every ``*.safetensors`` under ``root`` so a damaged file is named up front.

    safetensors refuses a header that does not parse or whose tensors do not exactly cover the file
    (truncation, garbage, a header that lies about sizes); transformers and diffusers would raise the
    same error as a traceback from deep inside their loaders.
    """
    from safetensors import safe_open

    for path in sorted(Path(root).rglob("*.safetensors")):
        try:
            with safe_open(str(path), framework="numpy") as fh:
                fh.keys()
        except Exception as err:  # SafetensorError, OSError, a header that is not UTF-8 JSON
            raise StillroomError(
                f"weights file '{path}' is damaged: {' '.join(str(err).split())[:160]}",
                "the model directory is truncated or corrupt; re-create it (or resume the run that wrote it)",
            ) from err


def detect(src: str | Path) -> Source:
    root = Path(src).expanduser()
    if not root.is_dir():
        raise StillroomError(
            f"export source '{src}' is not a directory",
            "give a `stillroom distill` run directory or a model directory",
        )
    info: dict[str, Any] = {"path": str(root.resolve())}
    if (root / "run.json").is_file():
        run = _json(root / "run.json")
        student = root / str(run.get("student", "student"))
        if not student.is_dir():
            raise StillroomError(
                f"run '{root}' has no student directory", "the run did not finish; resume it"
            )
        found = detect(student)
        found.info = {
            **found.info,
            "type": "run",
            "run": str(root.resolve()),
            "method": run.get("method"),
            "steps": run.get("steps"),
        }
        return found
    check_weights(root)
    card = _json(root / "stillroom.json") if (root / "stillroom.json").is_file() else {}
    if card.get("sampler"):
        return Source(
            "generator",
            root,
            {**info, "type": "generator-student", "method": card.get("method"), "sampler": card["sampler"]},
        )
    if (root / "config.json").is_file():
        config = _json(root / "config.json")
        archs = config.get("architectures") or []
        if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs) or not archs:
            kind = "lm-student" if card else "transformers"
            return Source(
                "causal-lm",
                root,
                {**info, "type": kind, "model_type": config.get("model_type"), "method": card.get("method")},
            )
    if (root / "unet").is_dir():
        raise StillroomError(
            f"'{root}' is a diffusers model without a few-step sampler (no stillroom.json)",
            "export the 'student' directory of a diffusion distill run",
        )
    raise StillroomError(
        f"cannot tell what '{root}' holds (no run.json, stillroom.json or config.json)",
        "give a distill run directory, a transformers causal-LM directory or a generator student",
    )
