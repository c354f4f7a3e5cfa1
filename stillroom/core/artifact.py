"""The artifact: the only contract between export and serve.

An artifact is a directory of model files plus ``manifest.json``::

    {"format_version": 2,
     "kind": KIND, "family": NAME, "task": TASK,  # the family's artifact kind (Family.kind), its name,
                                                  # and what the model does ("text-generation", ...)
     "files": [{"path", "sha256", "bytes"}],
     "graphs": {"model": "model.onnx", "text_encoder": "text_encoder.onnx", ...},
     "inputs": [{"name", "dtype", "shape"}], "outputs": [...],      # shape: ints or dim names
     "spec": {...},             # what a runtime needs to run the graphs, typed by the family's own
                                # pydantic model (e.g. a model's geometry and special ids)
     "tokenizer": "tokenizer" | null,                                 # a folder inside the artifact
     "teacher": "teacher" | null,           # the teacher, copied in by `export --with-teacher`
     "format": "onnx" | "tensorrt" | ..., "exporter": "dynamo" | "torchscript" | ...,
     "variant": "" | NAME,                      # which graph the exporter built (the family's names)
     "precision": "fp32" | "fp16" | "int8",
     "provenance": {"created", "method", "teacher", "data", "recipe_sha256", "train_steps", "source",
                    "versions"},
     "validation": {"passed": true, "max_abs_diff", "tolerance", ...},
     "extra": {...}}            # facts of the export (timings, sizes, int8 op counts); never read to run

An artifact is self-contained: runtimes, bench and serve read only files inside it. ``provenance``
records where it came from (the run folder among it) for people, never to be read back.

The manifest is written last, after validation passed, so a crash or a failed validation never
leaves a directory that claims to be a valid artifact. Loading checks every file's size and
sha256 and refuses paths that escape the directory (absolute, ``..``, symlinks out).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stillroom.core.errors import StillroomError
from stillroom.core.fsio import write_json

FORMAT_VERSION = 2
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


class Provenance(_Strict):
    """Where an artifact came from; for people and audits, never read back to run it."""

    created: str = ""  # ISO 8601, UTC
    method: str | None = None  # the distillation method that trained the student
    teacher: str | None = None  # the teacher's spec as the recipe named it (hub id, embedded:NAME, path)
    data: str | None = None  # the training data's spec (bench scores the student on its held-out split)
    recipe_sha256: str | None = None  # of the recipe, canonical JSON
    train_steps: int | None = None  # optimizer steps of the run
    source: dict[str, Any] = Field(default_factory=dict)  # what export was pointed at
    versions: dict[str, str] = Field(default_factory=dict)  # python and library versions


class Manifest(_Strict):
    format_version: int = FORMAT_VERSION
    kind: str = Field(min_length=1)  # a registered family's ``kind``; runtimes find the family by it
    family: str = ""  # the family's name
    task: str = ""  # what the model does, e.g. "text-generation", "class-conditional-image-generation"
    format: str = "onnx"
    exporter: str = ""
    variant: str = ""  # the exporter's name for the graph it built; runtimes choose their path from it
    precision: str = "fp32"
    files: list[FileEntry] = Field(default_factory=list)
    graphs: dict[str, str] = Field(default_factory=dict)
    inputs: list[TensorSpec] = Field(default_factory=list)
    outputs: list[TensorSpec] = Field(default_factory=list)
    spec: dict[str, Any] = Field(default_factory=dict)  # validated by the family's spec model
    tokenizer: str | None = None
    teacher: str | None = None
    provenance: Provenance = Field(default_factory=Provenance)
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
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StillroomError(
            f"'{path}' is not valid JSON (truncated or corrupt)", "re-run the export"
        ) from err
    version = data.get("format_version") if isinstance(data, dict) else None
    if isinstance(version, int) and version != FORMAT_VERSION:
        raise StillroomError(
            f"'{path}' has format_version {version}; this stillroom reads {FORMAT_VERSION}",
            "upgrade stillroom" if version > FORMAT_VERSION else "re-export it with this stillroom",
        )
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as err:
        raise StillroomError(f"'{path}' is not a valid manifest: {_first(err)}", "re-export it") from None
    return manifest


def _first(err: ValidationError) -> str:
    first = err.errors()[0]
    return f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"


SpecModel = TypeVar("SpecModel", bound=BaseModel)


def typed_spec(manifest: Manifest, model: type[SpecModel]) -> SpecModel:
    """``manifest.spec`` validated by a family's spec ``model``; a malformed one is one clear error."""
    try:
        return model.model_validate(manifest.spec)
    except ValidationError as err:
        raise StillroomError(
            f"the {manifest.kind} manifest's spec is invalid: {_first(err)}", "re-run `stillroom export`"
        ) from None


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
    for rel in [*manifest.graphs.values(), *filter(None, (manifest.tokenizer, manifest.teacher))]:
        safe_join(root, rel)
    return Artifact(root, manifest)
