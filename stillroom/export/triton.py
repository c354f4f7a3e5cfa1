"""Artifact -> Triton Inference Server model repository.

``stillroom export RUN --to triton --out REPO [--name NAME]`` makes ``REPO`` the repository root::

    REPO/NAME/config.pbtxt                platform "onnxruntime_onnx" ("tensorrt_plan" for an engine)
    REPO/NAME/1/model.onnx (+ .data)      the artifact's main graph, as exported and validated
    REPO/NAME/1/tokenizer/                LMs: what a client needs to make ``input_ids``
    REPO/NAME_generate/config.pbtxt       backend "python": text in, text out / labels in, images out
    REPO/NAME_generate/1/model.py         one line: ``from stillroom.serve.triton_model import ...``
    REPO/NAME_generate/1/artifact/        the complete artifact (manifest, graphs, tokenizer)
    REPO/manifest.json                    format "triton": what ``stillroom inspect REPO`` reads

NAME defaults to the run's method and family (``kd_lm``, ``progressive_diffusion``), not to the
folder's name: the folder is the repository, and one server usually loads several repositories.

Triton loads every folder at the root as a model and ignores plain files, so the root holds only the
two model folders and ``manifest.json``. Keeping the manifest there costs nothing in Triton and keeps
``REPO`` an artifact like every other export: ``stillroom inspect REPO`` and ``artifact.load(REPO)``
verify every file's sha256, both models included, and ``stillroom run`` finds a finished export.

``NAME`` is the raw graph for clients that drive it themselves. An LM's KV-cache graph needs a
client-side decode loop, and a generator's wants noise and class labels, so ``NAME_generate`` does
that on the server: a Python-backend model that opens ``1/artifact`` with stillroom's own runtime
loader and runs its generation (``stillroom.serve.triton_model`` documents the tensors). Its
``model.py`` imports stillroom, so stillroom must be installed in the Python environment of Triton's
Python backend (``pip install stillroom`` in the Triton image, or a packed environment named by the
model's ``EXECUTION_ENV_PATH`` parameter); torch is not needed there.

``config.pbtxt`` is protobuf text of Triton's ``ModelConfig``. With ``max_batch_size > 0`` Triton owns
the batch dim, so ``dims`` are the graph's shape after it (dynamic dims are -1) and an input that is
only the batch dim (a generator's ``class_labels`` of shape ``[batch]``) is ``dims: [ 1 ]`` with
``reshape: { shape: [ ] }``. LMs with a KV cache carry state across calls; they are still batchable per
call (every request brings its own cache), so the same layout applies. The generate models take
whole requests (``max_batch_size: 0``: ``dims`` are full shapes).
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from stillroom.core import artifact
from stillroom.core.errors import StillroomError
from stillroom.core.fsio import atomic_dir, write_text
from stillroom.core.host import get_host

log = logging.getLogger(__name__)

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
    "bytes": "TYPE_STRING",
}
PLATFORMS = {"onnx": ("onnxruntime_onnx", "model.onnx"), "tensorrt": ("tensorrt_plan", "model.plan")}
GENERATE = "_generate"  # suffix of the Python-backend model's name
MODEL_PY = "from stillroom.serve.triton_model import TritonPythonModel  # noqa: F401\n"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _tensor(name: str, dtype: str, dims: list[int | str], optional: bool = False) -> str:
    """One entry of ``input [...]`` / ``output [...]``; string dims are dynamic (-1)."""
    if dtype not in TRITON_TYPES:
        raise StillroomError(
            f"tensor '{name}' has dtype {dtype} that Triton has no type for", "export an fp32 or fp16 graph"
        )
    lines = [f'name: "{name}"', f"data_type: {TRITON_TYPES[dtype]}"]
    if dims:
        lines.append("dims: [ " + ", ".join(str(d) if isinstance(d, int) else "-1" for d in dims) + " ]")
    else:  # a scalar per batch row (or a scalar graph input): Triton wants one element, reshaped to []
        lines += ["dims: [ 1 ]", "reshape: { shape: [ ] }"]
    if optional:
        lines.append("optional: true")
    return "  {\n" + "\n".join(f"    {line}" for line in lines) + "\n  }"


def _io(inputs: list[str], outputs: list[str]) -> list[str]:
    return ["input [\n" + ",\n".join(inputs) + "\n]", "output [\n" + ",\n".join(outputs) + "\n]"]


def _instances(count: int, kind: str) -> str:
    return f"instance_group [\n  {{\n    count: {count}\n    kind: {kind}\n  }}\n]"


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
    specs = [*manifest.inputs, *manifest.outputs]
    batched = max_batch_size > 0 and all(s.shape and isinstance(s.shape[0], str) for s in specs)

    def tensors(group: list[artifact.TensorSpec]) -> list[str]:
        return [_tensor(s.name, s.dtype, s.shape[1:] if batched else s.shape) for s in group]

    lines = [
        f'name: "{name}"',
        f'platform: "{platform}"',
        f'default_model_filename: "{filename}"',
        f"max_batch_size: {max_batch_size if batched else 0}",
        *_io(tensors(manifest.inputs), tensors(manifest.outputs)),
    ]
    if batched:
        lines.append("dynamic_batching {\n  max_queue_delay_microseconds: 1000\n}")
    lines.append(_instances(instances, kind))
    return "\n".join(lines) + "\n"


def _image_dims(manifest: artifact.Manifest) -> list[int]:
    """[H, W, C] of the images a generator makes, from its sampler spec (-1 where it does not say)."""
    spec = getattr(manifest, "spec", None) or getattr(manifest, "sampler", None) or {}
    size = spec.get("image_size", -1)
    height, width = (size, size) if isinstance(size, int) else size
    return [int(height), int(width), int(spec.get("channels", -1))]


def _generate_tensors(manifest: artifact.Manifest) -> tuple[list[str], list[str]] | None:
    """(inputs, outputs) of ``NAME_generate`` for the artifact's kind; None for a kind with no adapter.

    The names are what ``stillroom.serve.triton_model`` reads and writes.
    """
    seed = _tensor("seed", "int64", [1], optional=True)
    if manifest.kind == "causal-lm":
        inputs = [
            _tensor("text", "bytes", [-1]),
            _tensor("max_tokens", "int32", [1], optional=True),
            _tensor("temperature", "float32", [1], optional=True),
            seed,
        ]
        return inputs, [_tensor("text", "bytes", [-1])]
    if manifest.kind == "generator":
        graph_inputs = {s.name for s in manifest.inputs}
        if "class_labels" in graph_inputs:
            condition = _tensor("class_labels", "int64", [-1])
        elif "encoder_hidden_states" in graph_inputs:
            condition = _tensor("prompt", "bytes", [-1])
        else:
            condition = _tensor("num_images", "int32", [1])
        inputs = [condition, seed, _tensor("steps", "int32", [1], optional=True)]
        return inputs, [_tensor("images", "uint8", [-1, *_image_dims(manifest)])]
    return None


def generate_config_pbtxt(manifest: artifact.Manifest, name: str, instances: int = 1) -> str | None:
    """The text of ``NAME_generate/config.pbtxt``; None when stillroom has no adapter for the kind."""
    tensors = _generate_tensors(manifest)
    if tensors is None:
        return None
    lines = [f'name: "{name}"', 'backend: "python"', "max_batch_size: 0", *_io(*tensors)]
    lines.append(_instances(instances, "KIND_CPU"))  # the model picks its onnxruntime provider itself
    return "\n".join(lines) + "\n"


def default_name(manifest: artifact.Manifest) -> str:
    """``<method>_<family>`` of the run the artifact came from (just the family when no run said)."""
    provenance = getattr(manifest, "provenance", None)
    method = getattr(provenance, "method", None) or (getattr(manifest, "source", None) or {}).get("method")
    family = getattr(manifest, "family", "") or get_host().family_of_kind(manifest.kind).name
    return re.sub(r"[^A-Za-z0-9_.-]", "_", "_".join(p for p in (method, family) if p))


def _check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise StillroomError(
            f"'{name}' is not a usable Triton model name",
            "use letters, digits, '_', '-' and '.', starting with a letter or digit",
        )
    return name


def _write_raw_model(art: artifact.Artifact, folder: Path, config: str, filename: str) -> None:
    """NAME: its config, the main graph (and its external data) and the tokenizer, if any."""
    source = art.graph("model")
    (folder / "1").mkdir(parents=True)
    shutil.copy2(source, folder / "1" / filename)
    data = Path(str(source) + ".data")
    if data.is_file():
        shutil.copy2(data, folder / "1" / data.name)
    if art.manifest.tokenizer:
        shutil.copytree(art.path(art.manifest.tokenizer), folder / "1" / "tokenizer")
    write_text(folder / "config.pbtxt", config)


def _write_generate_model(art: artifact.Artifact, folder: Path, config: str) -> None:
    """NAME_generate: its config, the one-line ``model.py`` and the artifact that model runs."""
    _copy_artifact(art, folder / "1" / "artifact")
    write_text(folder / "1" / "model.py", MODEL_PY)
    write_text(folder / "config.pbtxt", config)


def _copy_artifact(art: artifact.Artifact, dest: Path) -> None:
    """The whole artifact into ``dest``, less a bundled teacher (which the model never runs)."""
    teacher = getattr(art.manifest, "teacher", None)
    skip = {Path(teacher).parts[0]} if teacher else set()
    shutil.copytree(
        art.root, dest, ignore=lambda where, names: skip & set(names) if where == str(art.root) else ()
    )
    if teacher:
        artifact.write_manifest(dest, art.manifest.model_copy(update={"teacher": None}))


def write_repository(
    art: artifact.Artifact,
    out_dir: Path,
    *,
    name: str | None = None,
    instances: int = 1,
    max_batch_size: int = 8,
) -> artifact.Artifact:
    """Writes the repository ``out_dir`` (atomically) and returns it as an artifact of format ``triton``."""
    m = art.manifest
    name = _check_name(name or default_name(m))
    generate = name + GENERATE
    raw_config = config_pbtxt(m, name, instances, max_batch_size)
    generate_config = generate_config_pbtxt(m, generate, instances)
    platform, filename = PLATFORMS[m.format]
    models = {name: {"platform": platform, "config": f"{name}/config.pbtxt"}}
    with atomic_dir(Path(out_dir)) as tmp:
        _write_raw_model(art, tmp / name, raw_config, filename)
        if generate_config is None:
            log.info("no Triton generate model for kind '%s': wrote the raw graph only", m.kind)
        else:
            _write_generate_model(art, tmp / generate, generate_config)
            models[generate] = {"backend": "python", "config": f"{generate}/config.pbtxt"}
        triton = {"name": name, "models": models, "instances": instances, "max_batch_size": max_batch_size}
        update = {
            "format": "triton",
            "graphs": {"model": f"{name}/1/{filename}"},
            "tokenizer": f"{name}/1/tokenizer" if m.tokenizer else None,
            "extra": {**m.extra, "triton": triton, "source_format": m.format},
        }
        if getattr(m, "teacher", None):
            update["teacher"] = None
        artifact.write_manifest(tmp, m.model_copy(update=update))
    return artifact.load(out_dir)
