"""ONNX artifact -> TensorRT engine artifact, with the TensorRT Python API (imported lazily).

- **Strongly typed network**: TensorRT 10.12+/11 dropped the FP16/INT8 builder flags; the network's
  precision is the ONNX graph's. So the graph is converted to the wanted precision first (``fp16``
  via ``variants.convert_fp16``); int8 engines need Q/DQ graphs from calibration and are refused.
- **Optimization profiles** come from the manifest's dynamic dims: every dim name gets (min, opt, max)
  from ``DEFAULT_RANGES`` or ``--profile NAME=MIN:OPT:MAX``.
- **Caches**: a persistent timing cache per (TensorRT version, compute capability), and an engine
  cache keyed by (ONNX sha256, TensorRT version, compute capability, profile, precision), both under
  ``$STILLROOM_CACHE/tensorrt`` (default ``~/.cache/stillroom/tensorrt``).
- **Validation**: engine outputs against ONNX Runtime on the same random inputs (at the profile's
  min and opt shapes), recorded in the manifest; it must be within the tolerance for the precision.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from stillroom.core import artifact, provenance
from stillroom.core.errors import StillroomError
from stillroom.core.fsio import atomic_dir, write_bytes

log = logging.getLogger(__name__)

INSTALL = (
    "install TensorRT on a machine with an NVIDIA GPU: `pip install 'stillroom[tensorrt]'` "
    "(tensorrt>=10.12) and onnxruntime-gpu instead of onnxruntime"
)
DEFAULT_RANGES = {
    "batch_size": (1, 4, 16),
    "sequence_length": (1, 64, 256),
    "past_sequence_length": (0, 64, 256),
    "total_sequence_length": (1, 128, 512),
}
OTHER_RANGE = (1, 8, 64)
TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2}
PLAN = "model.plan"


def require() -> Any:
    """The ``tensorrt`` module, or one line saying what is missing and how to install it."""
    try:
        import torch
    except ImportError as err:  # pragma: no cover - torch is a dependency
        raise StillroomError("TensorRT export needs torch with CUDA", INSTALL) from err
    if not torch.cuda.is_available():
        raise StillroomError(
            "TensorRT export needs an NVIDIA GPU and none is visible (torch.cuda.is_available() is False)",
            INSTALL,
        )
    try:
        import tensorrt
    except ImportError as err:
        raise StillroomError("the tensorrt Python package is not installed", INSTALL) from err
    return tensorrt


# -- CPU-side parts (tested without a GPU) -------------------------------------------------------
def parse_profiles(specs: tuple[str, ...] | list[str]) -> dict[str, tuple[int, int, int]]:
    """``["batch_size=1:4:16"]`` -> ``{"batch_size": (1, 4, 16)}``; min <= opt <= max is required."""
    out = {}
    for spec in specs:
        name, _, rng = spec.partition("=")
        parts = rng.split(":")
        if not name or len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
            raise StillroomError(f"bad --profile '{spec}'", "use DIM=MIN:OPT:MAX, e.g. batch_size=1:4:16")
        lo, opt, hi = (int(p) for p in parts)
        if not lo <= opt <= hi:
            raise StillroomError(f"--profile '{spec}' needs MIN <= OPT <= MAX", "reorder the numbers")
        out[name.strip()] = (lo, opt, hi)
    return out


def derive_profiles(
    inputs: list[artifact.TensorSpec], overrides: dict[str, tuple[int, int, int]] | None = None
) -> dict[str, dict[str, list[int]]]:
    """Per input: {"min": shape, "opt": shape, "max": shape} from its dims (names -> ranges)."""
    overrides = overrides or {}
    known = {d for spec in inputs for d in spec.shape if isinstance(d, str)}
    unknown = set(overrides) - known
    if unknown:
        raise StillroomError(
            f"--profile names unknown dims {sorted(unknown)}", f"the graph's dims: {sorted(known)}"
        )
    profiles = {}
    for spec in inputs:
        shapes: dict[str, list[int]] = {"min": [], "opt": [], "max": []}
        for dim in spec.shape:
            rng = (
                (dim, dim, dim)
                if isinstance(dim, int)
                else overrides.get(dim, DEFAULT_RANGES.get(dim, OTHER_RANGE))
            )
            for key, value in zip(("min", "opt", "max"), rng, strict=True):
                shapes[key].append(int(value))
        profiles[spec.name] = shapes
    return profiles


def engine_cache_key(
    onnx_sha256: str,
    trt_version: str,
    compute_capability: tuple[int, int] | str,
    profiles: dict[str, Any],
    precision: str,
) -> str:
    """sha256 over everything that makes an engine invalid when it changes."""
    cc = (
        compute_capability
        if isinstance(compute_capability, str)
        else f"{compute_capability[0]}.{compute_capability[1]}"
    )
    blob = json.dumps(
        {
            "onnx": onnx_sha256,
            "tensorrt": trt_version,
            "cc": cc,
            "profiles": profiles,
            "precision": precision,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_dir() -> Path:
    base = os.environ.get("STILLROOM_CACHE") or str(Path.home() / ".cache" / "stillroom")
    path = Path(base) / "tensorrt"
    path.mkdir(parents=True, exist_ok=True)
    return path


def graph_for_precision(onnx_art: artifact.Artifact, precision: str, work: Path) -> Path:
    """The ONNX graph in ``precision`` (strongly typed networks take the graph's types)."""
    from stillroom.core import onnx_variants

    source = onnx_art.graph("model")
    if precision == onnx_art.manifest.precision:
        return source
    if precision == "int8":
        raise StillroomError(
            "int8 TensorRT engines need a Q/DQ graph from calibration, which stillroom does not make",
            "use --fp16 for TensorRT, or --int8 with --to onnx for CPU",
        )
    if onnx_art.manifest.precision != "fp32":
        raise StillroomError(
            f"cannot make a {precision} engine from a {onnx_art.manifest.precision} ONNX artifact",
            "start from the fp32 ONNX artifact",
        )
    if precision == "fp32":
        return source
    out = Path(work) / f"model.{precision}.onnx"
    onnx_variants.convert_fp16(source, out)
    return out


def random_inputs(
    inputs: list[artifact.TensorSpec],
    shapes: dict[str, list[int]],
    rng: np.random.Generator,
    vocab: int | None = None,
) -> dict[str, np.ndarray]:
    feeds = {}
    for spec in inputs:
        shape = shapes[spec.name]
        if spec.dtype.startswith("int"):
            high = vocab or 2
            if spec.name == "attention_mask":
                feeds[spec.name] = np.ones(shape, dtype=spec.dtype)
            elif spec.name == "position_ids":
                feeds[spec.name] = np.broadcast_to(np.arange(shape[-1]), shape).astype(spec.dtype)
            else:
                feeds[spec.name] = rng.integers(0, high, size=shape).astype(spec.dtype)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return feeds


# -- GPU parts -----------------------------------------------------------------------------------
def _compute_capability() -> tuple[int, int]:
    import torch

    return torch.cuda.get_device_capability()


def build_engine(trt, graph: Path, profiles: dict[str, dict[str, list[int]]], timing_cache: Path) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(graph)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise StillroomError(
            f"TensorRT could not parse '{graph}': {errors[:300]}", "check the opset / TensorRT version"
        )
    config = builder.create_builder_config()
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    for name, shapes in profiles.items():
        profile.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise StillroomError(
            f"TensorRT failed to build an engine from '{graph}'", "see the TensorRT log above"
        )
    write_bytes(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(plan))


def run_engine(trt, plan: bytes, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Runs a serialized engine once on CUDA (torch allocates the buffers)."""
    import torch

    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    context = engine.create_execution_context()
    keep = {}
    for name, value in feeds.items():
        tensor = torch.from_numpy(np.ascontiguousarray(value)).cuda()
        keep[name] = tensor
        context.set_input_shape(name, tuple(tensor.shape))
        context.set_tensor_address(name, tensor.data_ptr())
    outputs = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) != trt.TensorIOMode.OUTPUT:
            continue
        dtype = torch.from_numpy(np.zeros(0, dtype=trt.nptype(engine.get_tensor_dtype(name)))).dtype
        out = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda")
        outputs[name] = out
        context.set_tensor_address(name, out.data_ptr())
    stream = torch.cuda.Stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise StillroomError("TensorRT execution failed", "see the TensorRT log above")
    stream.synchronize()
    return {k: v.float().cpu().numpy() for k, v in outputs.items()}


def compare_with_ort(
    trt,
    plan: bytes,
    graph: Path,
    onnx_art: artifact.Artifact,
    profiles: dict[str, dict[str, list[int]]],
    precision: str,
) -> dict[str, Any]:
    from stillroom.core import ort_session

    sess, _ = ort_session.open_session(graph, ort_session.SessionOptions.checks())
    names = [o.name for o in sess.get_outputs()]
    vocab = onnx_art.manifest.spec.get("vocab_size")  # token-id inputs are drawn below it
    rng = np.random.default_rng(0)
    worst = 0.0
    for which in ("min", "opt"):
        shapes = {name: p[which] for name, p in profiles.items()}
        feeds = random_inputs(onnx_art.manifest.inputs, shapes, rng, vocab)
        ref = dict(zip(names, ort_session.run(sess, feeds), strict=True))
        got = run_engine(trt, plan, feeds)
        for name in names:
            worst = max(worst, float(np.abs(got[name] - ref[name].astype(np.float32)).max()))
    tol = TOLERANCE[precision]
    return {
        "passed": worst <= tol,
        "max_abs_diff_vs_ort": worst,
        "tolerance": tol,
        "shapes": ["min", "opt"],
        "criteria": "max |engine - ORT| on random inputs at the profile's min and opt shapes",
    }


def build(
    onnx_art: artifact.Artifact,
    out_dir: Path,
    *,
    precision: str = "fp32",
    profile_overrides: dict[str, tuple[int, int, int]] | None = None,
) -> artifact.Artifact:
    trt = require()
    from stillroom.core import staging

    profiles = derive_profiles(onnx_art.manifest.inputs, profile_overrides)
    cc = _compute_capability()
    started = time.perf_counter()
    with atomic_dir(Path(out_dir)) as tmp:
        work = staging.stage_dir(tmp, "work")
        graph = graph_for_precision(onnx_art, precision, work)
        onnx_sha = artifact.sha256_file(graph)
        key = engine_cache_key(onnx_sha, trt.__version__, cc, profiles, precision)
        cached = cache_dir() / f"{key}.plan"
        if cached.is_file():
            plan, hit = cached.read_bytes(), True
        else:
            plan = build_engine(
                trt, graph, profiles, cache_dir() / f"timing-{trt.__version__}-sm{cc[0]}{cc[1]}.cache"
            )
            write_bytes(cached, plan)
            hit = False
        comparison = compare_with_ort(trt, plan, graph, onnx_art, profiles, precision)
        if not comparison["passed"]:
            raise staging.validation_failed(
                "TensorRT engine",
                {"max_abs_diff": comparison["max_abs_diff_vs_ort"], "tolerance": comparison["tolerance"]},
            )
        write_bytes(tmp / PLAN, plan)
        if onnx_art.manifest.tokenizer:
            shutil.copytree(onnx_art.path(onnx_art.manifest.tokenizer), tmp / "tokenizer")
        for leftover in Path(tmp).glob(".stage-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        m = onnx_art.manifest
        manifest = m.model_copy(
            update={
                "format": "tensorrt",
                "exporter": f"tensorrt {trt.__version__}",
                "precision": precision,
                "graphs": {"model": PLAN},
                "tokenizer": "tokenizer" if onnx_art.manifest.tokenizer else None,
                "validation": {**comparison, "onnx": m.validation},
                "teacher": None,
                "provenance": m.provenance.model_copy(
                    update={
                        "versions": {**provenance.versions(), "tensorrt": trt.__version__},
                        "source": {
                            "type": "onnx-artifact",
                            "path": str(onnx_art.root),
                            "onnx": m.provenance.source,
                        },
                    }
                ),
                "extra": {
                    **m.extra,
                    "profiles": profiles,
                    "engine_cache_key": key,
                    "engine_cache_hit": hit,
                    "compute_capability": f"{cc[0]}.{cc[1]}",
                    "onnx_sha256": onnx_sha,
                    "build_seconds": round(time.perf_counter() - started, 3),
                },
            }
        )
        artifact.write_manifest(tmp, manifest)
    return artifact.load(out_dir)
