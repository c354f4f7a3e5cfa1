"""The image-classifier family as export, bench and serve see it (``stillroom.core.family.Family``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stillroom.core.family import Family, Source
from stillroom.core.source import read_json
from stillroom.plugins.classifier.spec import KIND, is_classifier_dir


class ClassifierFamily(Family):
    name = "classifier"
    kind = KIND
    metric = "accuracy"
    higher_is_better = True
    quality_keys = ("accuracy", "ece", "top1_agreement")

    def detect(self, path: Path) -> Source | None:
        """A classifier directory (``config.json`` naming a classifier architecture): a distilled
        student (with ``stillroom.json``) or a plain one such as the teacher."""
        if not self.claims(path):
            return None
        card = read_json(path / "stillroom.json") if (path / "stillroom.json").is_file() else {}
        info = {"type": "classifier-student" if card else "classifier", "method": card.get("method")}
        return Source(self.kind, path, info)

    def claims(self, path: Path) -> bool:
        """Classifier directories (students and teachers), for the torch runtime."""
        return is_classifier_dir(path)

    def export_onnx(
        self,
        src: Path,
        out: Path,
        *,
        opset: int | None = None,
        fp16: bool = False,
        int8: bool = False,
        **_: Any,
    ):
        from stillroom.plugins.classifier.export import export_classifier

        return export_classifier(src, out, opset=opset, fp16=fp16, int8=int8)

    def load(self, runtime: str, target: str, **options: Any):
        from stillroom.plugins.classifier import runtime as runtimes

        return runtimes.load(runtime, target, **options)

    def bench_inputs(self, artifact_dir: Path | None, workdir: Path) -> dict[str, Any]:
        """The held-out images of the student's training data, as ``{"heldout": path}``."""
        from stillroom.plugins.classifier import bench

        return bench.bench_inputs(artifact_dir, workdir)

    def bench(self, model: Any, job: dict[str, Any], settings: Any, out: Path) -> dict[str, Any]:
        from stillroom.plugins.classifier import bench

        return bench.bench(model, job, settings, out)

    def compare(self, teacher: dict[str, Any], student: dict[str, Any]) -> dict[str, Any]:
        """Top-1 agreement with the teacher on the held-out images both scored."""
        from stillroom.plugins.classifier import bench

        return bench.compare(teacher, student)
