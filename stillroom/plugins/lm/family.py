"""The causal-LM family as export, bench and serve see it (``stillroom.core.family.Family``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from stillroom.core.family import Family, Source
from stillroom.core.source import read_json

log = logging.getLogger(__name__)


class CausalLMFamily(Family):
    name = "lm"
    kind = "causal-lm"
    metric = "perplexity"
    quality_keys = ("perplexity", "top1_agreement")

    def detect(self, path: Path) -> Source | None:
        """A transformers causal-LM directory (``config.json``), a stillroom LM student or a plain one."""
        if not (path / "config.json").is_file():
            return None
        config = read_json(path / "config.json")
        archs = config.get("architectures") or []
        if archs and not any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
            return None
        card = read_json(path / "stillroom.json") if (path / "stillroom.json").is_file() else {}
        kind = "lm-student" if card else "transformers"
        info = {"type": kind, "model_type": config.get("model_type"), "method": card.get("method")}
        return Source(self.kind, path, info)

    def claims(self, path: Path) -> bool:
        """transformers directories, and specs that are not local paths (hub ids)."""
        return (path / "config.json").is_file() or not path.exists()

    def export_onnx(
        self,
        src: Path,
        out: Path,
        *,
        steps: int | None = None,
        int8: bool = False,
        fp16: bool = False,
        opset: int | None = None,
        optimize: bool = False,
        fused: bool = False,
        last_logits: bool = False,
        weight_only: str | None = None,
        **_: Any,
    ):
        from stillroom.plugins.lm.export.onnx_artifact import export_causal_lm

        if steps is not None:
            log.warning("--steps applies to generators; ignored for a causal LM")
        return export_causal_lm(
            src,
            out,
            opset=opset,
            int8=int8,
            fp16=fp16,
            optimize=optimize,
            fused=fused,
            last_logits=last_logits,
            weight_only=weight_only,
        )

    def load(self, runtime: str, target: str, **options: Any):
        from stillroom.plugins.lm import runtime as runtimes

        return runtimes.load(runtime, target, **options)

    def bench(self, model: Any, job: dict[str, Any], settings: Any, out: Path) -> dict[str, Any]:
        from stillroom.plugins.lm import bench

        return bench.bench(model, job, settings, out)

    def bench_inputs(self, artifact_dir: Path | None, workdir: Path) -> dict[str, Any]:
        """The held-out text of the student's training data, as ``{"heldout": path}``."""
        from stillroom.plugins.lm import bench_parent

        return bench_parent.bench_inputs(artifact_dir, workdir)

    def compare(self, teacher: dict[str, Any], student: dict[str, Any]) -> dict[str, Any]:
        """Top-1 agreement with the teacher on the held-out tokens (same tokenizer only)."""
        from stillroom.plugins.lm import bench_parent

        return bench_parent.compare(teacher, student)
