"""What ``stillroom export SRC`` was pointed at: a distill run or a student / model directory.

A ``stillroom distill`` run directory (``run.json`` + ``student/``) stands for its student. Any other
directory is offered to the registered families (``Family.detect``); the first that recognises it
says what it is. The manifest's ``source`` records which, with the path and (for runs) the method and
step count.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stillroom.core.errors import StillroomError
from stillroom.core.family import Source

__all__ = ["Source", "check_weights", "detect", "read_json"]


def read_json(path: Path) -> dict[str, Any]:
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
    if (root / "run.json").is_file():
        run = read_json(root / "run.json")
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
    from stillroom.core.host import get_host

    families = get_host().families()
    for family in families:
        found = family.detect(root)
        if found is not None:
            found.info = {"path": str(root.resolve()), **found.info}
            return found
    names = ", ".join(f.name for f in families) or "none installed"
    raise StillroomError(
        f"cannot tell what '{root}' holds: no run.json, and no family ({names}) recognises it",
        "give a distill run directory or a student / model directory (`stillroom plugins` lists families)",
    )
