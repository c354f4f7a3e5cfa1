"""The dataset family as the pipeline, bench and inspect see it (``stillroom.core.family.Family``).

Its training output is already its artifact (``exports = False``): ``stillroom run`` skips export,
``stillroom bench DATASET`` trains fresh ConvNets on it (``bench.run``) and ``stillroom inspect DATASET``
shows its card. There is no model to load or export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stillroom.core.errors import StillroomError
from stillroom.core.family import Family, Source
from stillroom.plugins.dataset import artifact


class DatasetFamily(Family):
    name = "dataset"
    kind = artifact.KIND
    metric = "accuracy"
    higher_is_better = True
    quality_keys = ("accuracy", "accuracy_std")
    exports = False

    def detect(self, path: Path) -> Source | None:
        if not artifact.is_dataset_dir(path):
            return None
        card = json.loads((Path(path) / artifact.CARD).read_text(encoding="utf-8"))
        return Source(self.kind, Path(path), {"type": "dataset", "method": card.get("method")})

    def claims(self, path: Path) -> bool:
        return artifact.is_dataset_dir(path)

    def export_onnx(self, src: Path, out: Path, **options: Any):
        raise StillroomError(
            f"'{src}' is a distilled dataset: there is no model to export",
            "benchmark it with `stillroom bench DATASET --out DIR`",
        )

    def load(self, runtime: str, target: str, **options: Any):
        raise StillroomError(
            f"'{target}' is a distilled dataset, not a model",
            "benchmark it with `stillroom bench DATASET --out DIR`",
        )

    def describe(self, path: Path) -> dict[str, Any]:
        _, _, card = artifact.read(path)
        return {"path": str(Path(path).resolve()), "family": self.name, **card}

    def bench_output(self, path: Path, out: Path, settings: Any) -> dict[str, Any]:
        from stillroom.plugins.dataset import bench

        return bench.run(path, out)
