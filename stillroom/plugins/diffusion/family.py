"""The few-step generator family as export, bench and serve see it (``stillroom.core.family.Family``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stillroom.core.errors import StillroomError
from stillroom.core.family import Family, Source
from stillroom.core.source import read_json


class GeneratorFamily(Family):
    name = "diffusion"
    kind = "generator"
    metric = "fid_like"
    quality_keys = ("fid_like", "class_accuracy", "diversity", "recall")

    def detect(self, path: Path) -> Source | None:
        """A generator student (``stillroom.json`` with a ``sampler``, ``unet/``)."""
        card = read_json(path / "stillroom.json") if (path / "stillroom.json").is_file() else {}
        if card.get("sampler"):
            info = {"type": "generator-student", "method": card.get("method"), "sampler": card["sampler"]}
            return Source(self.kind, path, info)
        if (path / "unet").is_dir():
            raise StillroomError(
                f"'{path}' is a diffusers model without a few-step sampler (no stillroom.json)",
                "export the 'student' directory of a diffusion distill run",
            )
        return None

    def claims(self, path: Path) -> bool:
        """Generator students and diffusers teachers (a ``unet/`` folder)."""
        return (path / "unet").is_dir()

    def export_onnx(
        self,
        src: Path,
        out: Path,
        *,
        steps: int | None = None,
        opset: int | None = None,
        fp16: bool = False,
        int8: bool = False,
        **_: Any,
    ):
        from stillroom.plugins.diffusion.export import export_generator

        return export_generator(src, out, steps=steps, opset=opset, fp16=fp16, int8=int8)

    def load(self, runtime: str, target: str, **options: Any):
        from stillroom.plugins.diffusion import runtime as runtimes

        return runtimes.load(runtime, target, **options)

    def bench(self, model: Any, job: dict[str, Any], settings: Any, out: Path) -> dict[str, Any]:
        from stillroom.plugins.diffusion import bench

        return bench.bench(model, job, settings, out)
