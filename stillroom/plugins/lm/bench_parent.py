"""The causal-LM benchmark's work in the parent process, around the per-target processes of ``bench``.

Before: the held-out text is read once and written to one file every target scores perplexity on, so
student and teacher see the same tokens. After: top-1 agreement of a student with its teacher,
position by position on those tokens, from the argmax predictions each target's process saved; only
when both tokenizers are the same (the same ids mean the same tokens).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from stillroom.core.artifact import read_manifest
from stillroom.core.errors import StillroomError
from stillroom.core.fsio import write_text

log = logging.getLogger(__name__)
DEFAULT_DATA = "embedded:shakespeare"


def heldout_text(artifact_dir: str | Path | None) -> str:
    """The held-out split of the student's training data (the manifest's ``provenance.data``), else
    Shakespeare when the artifact names none or its data is no longer at hand (a warning says so).

    A source without a valid split gives its train split: an honest in-distribution score beats none.
    """
    from stillroom.plugins.lm import data as textdata

    source = DEFAULT_DATA
    if artifact_dir is not None:
        source = read_manifest(Path(artifact_dir)).provenance.data or DEFAULT_DATA
    try:
        files = textdata.split_files(source, "valid") or textdata.split_files(source, "train")
    except StillroomError as err:
        log.warning("%s; scoring perplexity on %s instead", err, DEFAULT_DATA)
        files = textdata.split_files(DEFAULT_DATA, "valid")
    return "\n".join(r.text for r in textdata.read_records(files))


def bench_inputs(artifact_dir: Path | None, workdir: Path) -> dict[str, Any]:
    """``{"heldout": path}``: ``workdir/heldout.txt``, the text ``bench`` reads in every target's job."""
    path = Path(workdir) / "heldout.txt"
    write_text(path, heldout_text(artifact_dir))
    return {"heldout": str(path)}


def top1_agreement(teacher_argmax: str | None, student_argmax: str | None) -> float | None:
    """The fraction of positions where both predicted the same token; None without comparable arrays."""
    if not teacher_argmax or not student_argmax:
        return None
    a, b = np.load(teacher_argmax), np.load(student_argmax)
    return float((a == b).mean()) if a.shape == b.shape else None


def compare(teacher: dict[str, Any], student: dict[str, Any]) -> dict[str, Any]:
    """``{"top1_agreement": ...}`` when the two tokenizers match (fingerprints), else {}."""
    if teacher.get("tokenizer") != student.get("tokenizer"):
        return {}
    arrays = (teacher.get("arrays") or {}, student.get("arrays") or {})
    return {"top1_agreement": top1_agreement(arrays[0].get("argmax"), arrays[1].get("argmax"))}
