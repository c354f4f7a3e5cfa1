"""The Family API: what export, bench and serve ask of a family of students.

A family (one plugin package: its models, data, metrics, methods) also owns what is specific to its
students after training: which directories it can export, how it exports them to a validated ONNX
artifact, how each runtime loads its artifacts and models, and what its benchmark measures.
``export/`` and ``serve/`` name no family; they find the one that owns a directory or an artifact
through the host (``register_families``) and call these methods:

    source = stillroom.core.source.detect(path)           # a family's detect(path) claimed it
    artifact = get_host().family_of_kind(source.kind).export_onnx(path, out, **options)
    model = get_host().family_for_target(target).load("onnxruntime", target)
    result = family.bench(model, job, settings, out)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar


@dataclass
class Source:
    """What ``stillroom export SRC`` was pointed at, as the family that claimed it understood it.

    ``kind`` is the family's artifact kind, ``model_dir`` the directory to export, ``info`` what the
    manifest records as ``source`` (path, type, method, ...).
    """

    kind: str
    model_dir: Path
    info: dict[str, Any] = field(default_factory=dict)


class Family:
    """Base class of a family; subclasses set the class variables and implement the methods."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""  # the artifact kind its exporter writes and its runtimes read
    metric: ClassVar[str] = ""  # its primary quality metric in bench reports (lower is better)
    runtimes: ClassVar[tuple[str, ...]] = ()  # runtime names ``load`` accepts

    def detect(self, path: Path) -> Source | None:
        """A ``Source`` when ``path`` is a student or model directory this family exports, else None."""
        return None

    def claims(self, path: Path) -> bool:
        """Whether a model directory (not an artifact) is one of this family's, for the torch runtime."""
        return False

    def export_onnx(self, src: Path, out: Path, **options: Any) -> Any:
        """Exports ``src`` (a run or a directory ``detect`` claimed) into ``out`` as a validated ONNX
        artifact, manifest written last; options it does not use are ignored."""
        raise NotImplementedError(f"family {self.name!r} must implement export_onnx()")

    def load(self, runtime: str, target: str, **options: Any) -> Any:
        """The model behind ``target`` (an artifact or a model spec) on ``runtime``, for bench and serve."""
        raise NotImplementedError(f"family {self.name!r} must implement load()")

    def bench(self, model: Any, job: dict[str, Any], settings: Any, out: Path) -> dict[str, Any]:
        """Timing rows and quality of a loaded ``model`` (``settings``: ``core.bench_plan.BenchSettings``)."""
        raise NotImplementedError(f"family {self.name!r} must implement bench()")
