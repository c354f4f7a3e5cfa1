"""Classifier -> one validated ONNX graph: ``image [batch, C, H, W] float32 -> logits [batch, num_classes]``.

Any network of the family exports the same way (a CNN, an MLP-mixer student of ``had``, a cosine
prototype head). The input is the normalised image (the manifest's ``spec`` says how pixels become
it); the output is class logits, with an LELP student's subclasses already summed
(``models.class_logits``). The batch is dynamic (dynamo exporter, example batch 2).

Validation runs PyTorch and ONNX Runtime on the held-out split of the student's training data (its
card's ``data.source``, else ``embedded:mnist``), at batch sizes 1, 3 and ``CHUNK``, and passes when

- ``max |logits_ort - logits_torch| <= ATOL`` (float32 rounding of a small CNN is ~1e-5), and
- top-1 agreement with PyTorch >= ``MIN_AGREEMENT``: one flip in a thousand images is allowed for a
  near-tie that rounding can break (an undertrained student's logits can be that close).

The numbers are written in the manifest's ``validation``; the manifest is written last, only then.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stillroom.core import artifact, onnx_export, ort_session, provenance, staging
from stillroom.core.errors import StillroomError
from stillroom.core.fsio import atomic_dir
from stillroom.core.source import detect
from stillroom.plugins.classifier import data
from stillroom.plugins.classifier.models import Classifier, load_classifier
from stillroom.plugins.classifier.spec import KIND, TASK

log = logging.getLogger(__name__)
ATOL = 1e-3
MIN_AGREEMENT = 0.999
CHUNK = 256


def validate(model: Classifier, session, images: np.ndarray) -> dict[str, Any]:
    """PyTorch vs the ONNX session on ``images`` (normalised), in batches of 1, 3, then ``CHUNK``."""
    bounds = [0, 1, 4, *range(4 + CHUNK, len(images), CHUNK), len(images)]
    worst, same, seen = 0.0, 0, 0
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        batch = images[start:end]
        if not len(batch):
            continue
        with torch.no_grad():
            want = model(torch.from_numpy(batch)).numpy()
        got = ort_session.run(session, {"image": batch})[0]
        if got.shape != want.shape:
            return {
                "passed": False,
                "error": f"logits {list(got.shape)} != {list(want.shape)} at batch {len(batch)}",
            }
        worst = max(worst, float(np.abs(got - want).max()))
        same += int((got.argmax(-1) == want.argmax(-1)).sum())
        seen += len(batch)
    agreement = same / seen
    return {
        "passed": worst <= ATOL and agreement >= MIN_AGREEMENT,
        "max_abs_diff": worst,
        "tolerance": ATOL,
        "top1_agreement": agreement,
        "min_top1_agreement": MIN_AGREEMENT,
        "images": seen,
        "criteria": "max |ort - torch| logits <= tolerance and top-1 agreement >= min on held-out images",
    }


def export_classifier(
    src: Path, out: Path, *, opset: int | None = None, fp16: bool = False, int8: bool = False
) -> artifact.Artifact:
    """Exports the classifier ``src`` (a run, a student or a classifier directory) into ``out``."""
    if fp16 or int8:
        raise StillroomError(
            "classifier artifacts are fp32 only (no fp16 / int8 graph is built or validated)",
            "export without --fp16 / --int8",
        )
    source = detect(src)
    if source.kind != KIND:
        raise StillroomError(f"'{src}' is not an image classifier", "export it with its own family")
    model = load_classifier(source.model_dir)
    spec = model.config.spec()
    recipe = provenance.student_card(source.model_dir).get("recipe") or {}
    pixels, _ = data.load_split((recipe.get("data") or {}).get("source") or data.DEFAULT, "eval")
    images = spec.normalise(pixels)
    started = time.perf_counter()
    with atomic_dir(Path(out)) as tmp:
        graph = tmp / staging.GRAPH
        exported = onnx_export.export_module(
            model,
            (torch.from_numpy(images[:2]),),
            graph,
            ["image"],
            ["logits"],
            {"image": {0: "batch_size"}},
            opset=opset,
        )
        session, _ = ort_session.open_session(graph, ort_session.SessionOptions.checks())
        result = validate(model, session, images)
        log.debug("classifier graph: %s", result)
        if not result["passed"]:
            raise staging.validation_failed("classifier graph", result)
        inputs, outputs = onnx_export.tensor_specs(graph)
        extra: dict[str, Any] = {
            "export_seconds": round(time.perf_counter() - started, 3),
            "graph_bytes": graph.stat().st_size,
        }
        if exported.dynamo_error:
            extra["dynamo_error"] = exported.dynamo_error
        manifest = artifact.Manifest(
            kind=KIND,
            family="classifier",
            task=TASK,
            format="onnx",
            exporter=exported.exporter,
            precision="fp32",
            graphs={"model": staging.GRAPH},
            inputs=inputs,
            outputs=outputs,
            spec=spec.model_dump(mode="json"),
            provenance=provenance.record(source.info, source.model_dir),
            validation=result,
            extra=extra,
        )
        artifact.write_manifest(tmp, manifest)
    return artifact.load(out)
