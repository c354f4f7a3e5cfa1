"""The artifact: the only contract between export and serve.

An artifact is a directory of model files plus ``manifest.json``::

    {"format_version": 1, "kind": KIND,        # the family's artifact kind (Family.kind)
     "files": [{"path", "sha256", "bytes"}],
     "graphs": {"model": "model.onnx", "text_encoder": "text_encoder.onnx", ...},
     "inputs": [{"name", "dtype", "shape"}], "outputs": [...],      # shape: ints or dim names
     "sampler": {"steps", "timesteps", "guidance", ...} | null,       # samplers that unroll steps
     "tokenizer": "tokenizer" | null,                                 # a folder inside the artifact
     "format": "onnx" | "tensorrt", "exporter": "dynamo" | "torchscript" | ...,
     "variant": "" | NAME,                      # which graph the exporter built (the family's names)
     "precision": "fp32" | "fp16" | "int8", "source": {...}, "versions": {...},
     "validation": {"passed": true, "max_abs_diff", "tolerance", ...}, "extra": {...}}

The manifest is written last, after validation passed, so a crash or a failed validation never
leaves a directory that claims to be a valid artifact. Loading checks every file's size and
sha256 and refuses paths that escape the directory (absolute, ``..``, symlinks out).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stillroom.core.errors import StillroomError
from stillroom.core.fsio import write_json

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileEntry(_Strict):
    path: str
    sha256: str
    bytes: int


class TensorSpec(_Strict):
    name: str
    dtype: str
    shape: list[int | str]


class Manifest(_Strict):
    format_version: int = FORMAT_VERSION
    kind: str = Field(min_length=1)  # a registered family's ``kind``; runtimes find the family by it
    format: str = "onnx"
    exporter: str = ""
    variant: str = ""  # the exporter's name for the graph it built; runtimes choose their path from it
    precision: str = "fp32"
    files: list[FileEntry] = Field(default_factory=list)
    graphs: dict[str, str] = Field(default_factory=dict)
    inputs: list[TensorSpec] = Field(default_factory=list)
    outputs: list[TensorSpec] = Field(default_factory=list)
    sampler: dict[str, Any] | None = None
    tokenizer: str | None = None
    source: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    validation: dict[str, Any] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)


class Artifact:
    """A loaded, verified artifact: ``root`` and its ``manifest``."""

    def __init__(self, root: Path, manifest: Manifest) -> None:
        self.root, self.manifest = root, manifest

    @property
    def kind(self) -> str:
        return self.manifest.kind

    def path(self, relative: str) -> Path:
        return safe_join(self.root, relative)

    def graph(self, name: str = "model") -> Path:
        if name not in self.manifest.graphs:
            raise StillroomError(
                f"artifact '{self.root}' has no graph '{name}'",
                f"graphs: {', '.join(self.manifest.graphs) or 'none'}",
            )
        return self.path(self.manifest.graphs[name])


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def safe_join(root: Path, relative: str) -> Path:
    """``root/relative``, refusing anything that would leave ``root``."""
    pure = PurePosixPath(relative)
    if pure.is_absolute() or ".." in pure.parts or "\\" in relative or not relative:
        raise StillroomError(
            f"artifact path '{relative}' escapes the artifact directory", "the artifact is invalid"
        )
    root_resolved = Path(root).resolve()
    target = (root_resolved / pure).resolve()
    if root_resolved not in target.parents and target != root_resolved:
        raise StillroomError(
            f"artifact path '{relative}' escapes the artifact directory", "the artifact is invalid"
        )
    return target


def file_entries(root: Path, exclude: tuple[str, ...] = (MANIFEST,)) -> list[FileEntry]:
    """Every regular file under ``root`` (sorted), hashed."""
    root = Path(root)
    entries = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel in exclude or any(part.startswith(".") for part in PurePosixPath(rel).parts):
            continue
        entries.append(FileEntry(path=rel, sha256=sha256_file(path), bytes=path.stat().st_size))
    return entries


def write_manifest(root: Path, manifest: Manifest) -> Path:
    """Hashes every file of the artifact and writes ``manifest.json`` (call this last)."""
    root = Path(root)
    manifest = manifest.model_copy(update={"files": file_entries(root)})
    for name, rel in manifest.graphs.items():
        if not safe_join(root, rel).is_file():
            raise StillroomError(
                f"graph '{name}' file '{rel}' is missing from the artifact", "re-run the export"
            )
    write_json(root / MANIFEST, manifest.model_dump(mode="json"))
    return root / MANIFEST


def read_manifest(root: Path) -> Manifest:
    path = Path(root) / MANIFEST
    if not Path(root).is_dir():
        raise StillroomError(f"artifact directory '{root}' does not exist", "run `stillroom export` first")
    if not path.is_file():
        raise StillroomError(
            f"'{root}' has no {MANIFEST}: it is not a finished artifact",
            "re-run `stillroom export`; a manifest is only written after validation passes",
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        manifest = Manifest.model_validate(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StillroomError(
            f"'{path}' is not valid JSON (truncated or corrupt)", "re-run the export"
        ) from err
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise StillroomError(
            f"'{path}' is not a valid manifest: {where}: {first['msg']}", "re-run the export"
        ) from None
    if manifest.format_version > FORMAT_VERSION:
        raise StillroomError(
            f"'{path}' has format_version {manifest.format_version}; this stillroom reads {FORMAT_VERSION}",
            "upgrade stillroom",
        )
    return manifest


def load(root: str | Path, verify: bool = True) -> Artifact:
    """Reads and verifies an artifact; a missing, truncated or tampered file is an error."""
    root = Path(root)
    manifest = read_manifest(root)
    for entry in manifest.files:
        path = safe_join(root, entry.path)
        if not path.is_file():
            raise StillroomError(
                f"artifact file '{entry.path}' is missing from '{root}'", "re-run the export"
            )
        if not verify:
            continue
        if path.stat().st_size != entry.bytes or sha256_file(path) != entry.sha256:
            raise StillroomError(
                f"artifact file '{path}' does not match its sha256 in the manifest "
                "(modified, truncated or corrupt)",
                "re-run the export",
            )
    for rel in [*manifest.graphs.values(), *([manifest.tokenizer] if manifest.tokenizer else [])]:
        safe_join(root, rel)
    return Artifact(root, manifest)
