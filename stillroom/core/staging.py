"""Where an export is built: a temporary sibling of the output, renamed into place at the end.

Each graph stage (fp32, optimised, int8, fp16) is written to its own hidden folder inside the
staging directory, so external-data files keep their names; the stage that passed validation is
moved to the top and the others are deleted before ``write_manifest`` hashes what is left. A crash
or a kill at any point leaves no ``manifest.json`` at the output path.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from stillroom.core.errors import StillroomError

GRAPH = "model.onnx"


def stage_dir(root: Path, name: str) -> Path:
    path = Path(root) / f".stage-{name}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def promote(stage: Path, root: Path) -> None:
    """Moves every file of ``stage`` to ``root`` and removes all stage folders."""
    for item in Path(stage).iterdir():
        shutil.move(str(item), str(Path(root) / item.name))
    for leftover in Path(root).glob(".stage-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def validation_failed(what: str, result: dict) -> StillroomError:
    keys = (
        "max_abs_diff",
        "tolerance",
        "greedy_match_tokens",
        "greedy_total_tokens",
        "perplexity_rel_delta",
        "mean_abs_diff",
        "psnr_db",
        "thresholds",
        "error",
    )
    numbers = ", ".join(f"{k}={_fmt(result[k])}" for k in keys if k in result)
    return StillroomError(
        f"{what} failed validation: {numbers}",
        "no manifest was written; the exported graph does not compute what the model computes",
    )


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
