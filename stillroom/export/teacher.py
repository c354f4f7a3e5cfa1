"""``stillroom export --with-teacher``: the teacher copied into the artifact's ``teacher/`` folder.

``stillroom bench ARTIFACT`` compares a student with its teacher. The manifest's provenance names the
teacher as the recipe did (``embedded:NAME``, a hub id or a local path), which another machine may
not reach; with the copy inside, the artifact carries its own comparison wherever it goes. The copy
is made after the export (a folder written atomically, then the manifest rewritten last, hashing
the teacher's files with the rest).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from stillroom.core import artifact
from stillroom.core.errors import StillroomError
from stillroom.core.fsio import atomic_dir
from stillroom.data import locate

log = logging.getLogger(__name__)
FOLDER = "teacher"


def _local(spec: str) -> Path:
    """A local directory holding the teacher: embedded assets and paths as they are, hub ids fetched."""
    found = locate(spec, "teacher")
    if Path(found).is_dir():
        return Path(found)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=found))
    except Exception as err:  # offline, gated, unknown repo: the hub client's many error types
        raise StillroomError(
            f"cannot fetch teacher '{spec}' from the hub: {' '.join(str(err).split())[:160]}",
            "download it first and bench with --teacher PATH, or export without --with-teacher",
        ) from err


def bundle(art: artifact.Artifact, spec: str | None = None) -> artifact.Artifact:
    """Copies the teacher (``spec``, default: the one the artifact's recipe named) into ``teacher/``."""
    spec = spec or art.manifest.provenance.teacher
    if not spec:
        raise StillroomError(
            f"artifact '{art.root}' does not name a teacher (it was not exported from a distill run)",
            "export without --with-teacher and pass --teacher to `stillroom bench`",
        )
    source = _local(spec)
    with atomic_dir(art.root / FOLDER) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".*"))
    artifact.write_manifest(art.root, art.manifest.model_copy(update={"teacher": FOLDER}))
    log.info("teacher %s copied into %s", spec, art.root / FOLDER)
    return artifact.load(art.root)
