"""Artifact -> Triton Inference Server model repository.

    <repo>/<name>/config.pbtxt
    <repo>/<name>/1/model.onnx (+ model.onnx.data)   platform "onnxruntime_onnx"
    <repo>/<name>/1/model.plan                       platform "tensorrt_plan"
    <repo>/manifest.json                             the artifact manifest (format "triton")

``config.pbtxt`` is protobuf text of Triton's ``ModelConfig``: inputs/outputs with Triton data types
and the dims *after* the batch dim (Triton owns the batch dim when ``max_batch_size > 0``; dynamic
dims are -1), ``dynamic_batching`` and an ``instance_group``. LMs with a KV cache carry state across
calls; they are still batchable per call (every request brings its own cache), so the same layout
applies.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from stillroom.core import artifact
from stillroom.core.errors import StillroomError
from stillroom.core.fsio import atomic_dir, write_text

TRITON_TYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "bfloat16": "TYPE_BF16",
    "float64": "TYPE_FP64",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "int8": "TYPE_INT8",
    "uint8": "TYPE_UINT8",
    "bool": "TYPE_BOOL",
}
PLATFORMS = {"onnx": ("onnxruntime_onnx", "model.onnx"), "tensorrt": ("tensorrt_plan", "model.plan")}


def _tensor(spec: artifact.TensorSpec, batched: bool) -> str:
    if spec.dtype not in TRITON_TYPES:
        raise StillroomError(
            f"tensor '{spec.name}' has dtype {spec.dtype} that Triton has no type for",
            "export an fp32 or fp16 graph",
        )
    shape = spec.shape[1:] if batched else spec.shape
    dims = ", ".join(str(d) if isinstance(d, int) else "-1" for d in shape) or "1"
    body = f'    name: "{spec.name}"\n    data_type: {TRITON_TYPES[spec.dtype]}\n    dims: [ {dims} ]'
    return "  {\n" + body + "\n  }"


def config_pbtxt(
    manifest: artifact.Manifest,
    name: str,
    instances: int = 1,
    max_batch_size: int = 8,
    kind: str = "KIND_AUTO",
) -> str:
    """The text of ``config.pbtxt`` for the artifact's main graph."""
    if manifest.format not in PLATFORMS:
        raise StillroomError(
            f"Triton cannot serve a '{manifest.format}' artifact", "export to onnx or tensorrt"
        )
    platform, filename = PLATFORMS[manifest.format]
    batched = max_batch_size > 0 and all(
        s.shape and isinstance(s.shape[0], str) for s in [*manifest.inputs, *manifest.outputs]
    )
    lines = [
        f'name: "{name}"',
        f'platform: "{platform}"',
        f'default_model_filename: "{filename}"',
        f"max_batch_size: {max_batch_size if batched else 0}",
        "input [\n" + ",\n".join(_tensor(s, batched) for s in manifest.inputs) + "\n]",
        "output [\n" + ",\n".join(_tensor(s, batched) for s in manifest.outputs) + "\n]",
    ]
    if batched:
        lines.append("dynamic_batching {\n  max_queue_delay_microseconds: 1000\n}")
    lines.append(f"instance_group [\n  {{\n    count: {instances}\n    kind: {kind}\n  }}\n]")
    return "\n".join(lines) + "\n"


def write_repository(
    art: artifact.Artifact,
    out_dir: Path,
    *,
    name: str | None = None,
    instances: int = 1,
    max_batch_size: int = 8,
) -> artifact.Artifact:
    """Writes the repository (atomically) and returns it as an artifact with format ``triton``."""
    m = art.manifest
    name = name or Path(out_dir).resolve().parent.name.replace(" ", "_") or "model"
    platform, filename = PLATFORMS.get(m.format, (None, None))
    if platform is None:
        raise StillroomError(f"Triton cannot serve a '{m.format}' artifact", "export to onnx or tensorrt")
    source_graph = art.graph("model")
    with atomic_dir(Path(out_dir)) as tmp:
        version = tmp / name / "1"
        version.mkdir(parents=True)
        shutil.copy2(source_graph, version / filename)
        data = Path(str(source_graph) + ".data")
        if data.is_file():
            shutil.copy2(data, version / data.name)
        write_text(tmp / name / "config.pbtxt", config_pbtxt(m, name, instances, max_batch_size))
        if m.tokenizer:
            shutil.copytree(art.path(m.tokenizer), tmp / name / "tokenizer")
        manifest = m.model_copy(
            update={
                "format": "triton",
                "graphs": {"model": f"{name}/1/{filename}"},
                "tokenizer": f"{name}/tokenizer" if m.tokenizer else None,
                "extra": {
                    **m.extra,
                    "triton": {
                        "name": name,
                        "platform": platform,
                        "config": f"{name}/config.pbtxt",
                        "instances": instances,
                        "max_batch_size": max_batch_size,
                    },
                    "source_format": m.format,
                },
            }
        )
        artifact.write_manifest(tmp, manifest)
    return artifact.load(out_dir)
