"""The Family API: what export, bench and serve ask of a family of students.

A family (one plugin package: its models, data, metrics, methods) also owns what is specific to its
students after training: which directories it can export, how it exports them to a validated ONNX
artifact, how each runtime loads its artifacts and models, and what its benchmark measures.
``export/`` and ``serve/`` name no family; they find the one that owns a directory or an artifact
through the host (``register_families``) and call these methods:

    source = stillroom.core.source.detect(path)           # a family's detect(path) claimed it
    artifact = get_host().family_of_kind(source.kind).export_onnx(path, out, **options)
    model = get_host().family_for_target(target).load("onnxruntime", target)
    inputs = family.bench_inputs(artifact_dir, workdir)   # once per benchmark, shared by every target
    result = family.bench(model, {**inputs, "target": ..., "settings": ...}, settings, out)  # timing
    result["quality"] = get_host().metric(family.metric)(model, job, settings, out)["quality"]
    row["quality"].update(family.compare(teacher_result, student_result))
    columns = family.quality_keys                         # the report's quality columns

A family whose output is not a model (``exports = False``: e.g. a dataset) has no export or runtime;
``stillroom run`` skips export, and ``bench`` / ``inspect`` hand its folder to ``bench_output`` /
``describe``.
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
    """Base class of a family; subclasses set the class variables and implement the methods.

    ``metric`` and ``quality_keys`` describe the quality figures its ``bench`` (and ``compare``)
    report: ``quality_keys`` are the report's columns in order, the primary ``metric`` first. A family
    that sets only one of them gets the other from it.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""  # the artifact kind its exporter writes and its runtimes read
    metric: ClassVar[str] = ""  # its primary quality metric in bench reports
    higher_is_better: ClassVar[bool] = False  # the metric's direction (FID, perplexity: lower; accuracy)
    quality_keys: ClassVar[tuple[str, ...]] = ()  # bench report columns, ``metric`` first
    exports: ClassVar[bool] = True  # False: a run's output folder is itself the artifact (no model)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.quality_keys and not cls.metric:
            cls.metric = cls.quality_keys[0]
        elif cls.metric and not cls.quality_keys:
            cls.quality_keys = (cls.metric,)
        if cls.quality_keys and cls.quality_keys[0] != cls.metric:
            raise TypeError(f"{cls.__name__}.quality_keys must start with its primary metric {cls.metric!r}")

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

    def bench_inputs(self, artifact_dir: Path | None, workdir: Path) -> dict[str, Any]:
        """What every target of one benchmark reads, prepared once in the parent process.

        ``artifact_dir`` is the student artifact being benchmarked (None when there is none), so the
        inputs can follow its training (e.g. the held-out split of its data); files go under
        ``workdir``. The JSON-able dict is merged into each target's job (the keys ``target`` and
        ``settings`` are taken), which ``bench`` receives. Families whose targets need nothing
        shared return {}.
        """
        return {}

    def bench(self, model: Any, job: dict[str, Any], settings: Any, out: Path) -> dict[str, Any]:
        """Timing rows of a loaded ``model`` (``settings``: ``core.bench_plan.BenchSettings``):
        ``{"timing": [row per batch size], ...}``. Quality comes from the registered metrics
        (``register_metrics``; by default this family's ``metric``), called after it in the same
        process. Keys of either result stay on the target's report rows; arrays saved as
        ``out/NAME.npy`` are handed to ``compare`` and the report as ``result["arrays"][NAME]`` (their
        path) and kept out of report.json; the report draws one named ``grid`` (images [N, C, H, W] in
        [-1, 1]).
        """
        raise NotImplementedError(f"family {self.name!r} must implement bench()")

    # -- families whose output is not a model (``exports = False``) ---------------------------------
    def describe(self, path: Path) -> dict[str, Any]:
        """What ``stillroom inspect`` shows of an output folder this family ``claims`` (JSON-able)."""
        raise NotImplementedError(f"family {self.name!r} must implement describe()")

    def bench_output(self, path: Path, out: Path, settings: Any) -> dict[str, Any]:
        """``stillroom bench`` of an output folder this family ``claims``: measures it, writes
        report.json and report.html (last) into ``out`` and returns the report, whose ``kind`` is
        this family's."""
        raise NotImplementedError(f"family {self.name!r} must implement bench_output()")

    def compare(self, teacher: dict[str, Any], student: dict[str, Any]) -> dict[str, Any]:
        """Quality figures of a student relative to its teacher, from the two targets' ``bench`` results.

        They join the student's own quality (e.g. how often both predict the same token), because
        some figures only exist for a pair. The base family has none: {}.
        """
        return {}
