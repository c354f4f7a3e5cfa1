"""ONNX Runtime sessions: the one opener (``open_session``), provider choice, the active-provider
check and thread counts.

ORT takes a provider list in priority order and silently drops any provider it cannot start
(missing CUDA libraries, a build without TensorRT), running on CPU instead. A benchmark or server
that asked for CUDA and quietly measured CPU would report nonsense, so after creating the session we
compare the provider that is actually first in ``session.get_providers()`` with the one requested
and stop with a clear error unless fallback was explicitly allowed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stillroom.core.errors import StillroomError

log = logging.getLogger(__name__)

PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
PRIORITY = ("tensorrt", "cuda", "cpu")
GPU_PROVIDERS = ("tensorrt", "cuda")


@dataclass
class SessionOptions:
    """How to open a session; ``provider`` is "auto", "tensorrt", "cuda" or "cpu".

    Two presets name the settings callers chose by measurement: ``decode`` (token-by-token
    generation, where a step is hundreds of tiny operators) and ``checks`` (export validation on a
    shared machine).
    """

    provider: str = "auto"
    allow_fallback: bool = False
    intra_op_threads: int | None = None
    inter_op_threads: int | None = None
    device_id: int = 0
    spin: bool | None = None  # None: decided by ``spin_waiting``

    @classmethod
    def decode(
        cls,
        provider: str = "cpu",
        threads: int | None = None,
        inter_op_threads: int | None = None,
        **rest: Any,
    ) -> SessionOptions:
        """The decode settings of ``benchmarks/lm_runtime.py``: intra-op threads = ``threads``, else
        OMP_NUM_THREADS, else every core this process may use; one inter-op thread (the graph runs
        sequentially, a second pool would only wait); spinning as ``spin_waiting`` decides."""
        return cls(
            provider=provider,
            intra_op_threads=threads or omp_threads() or physical_cores(),
            inter_op_threads=inter_op_threads or 1,
            **rest,
        )

    @classmethod
    def checks(cls) -> SessionOptions:
        """Export validation: CPU (the reference every artifact must pass), OMP_NUM_THREADS respected so
        an export on a shared machine takes the cores it was given, not all of them."""
        threads = omp_threads()
        return cls(provider="cpu", intra_op_threads=threads, inter_op_threads=1 if threads else None)


def omp_threads() -> int | None:
    """OMP_NUM_THREADS as a number (None when unset or 0)."""
    return int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or None


def physical_cores() -> int:
    """CPUs this process may use (affinity), the default intra-op thread count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def spin_waiting(spin: bool | None, threads: int) -> bool:
    """Whether idle intra-op threads spin-wait between operators instead of sleeping.

    Spinning cuts the hand-over latency of the ~250 operators of a decode step; on a machine whose
    other jobs want the same cores it steals the cycles the step needs. Measured with
    ``benchmarks/lm_runtime.py`` (a 135M-parameter decoder, fp32, 2 threads on 2 cores): quiet machine
    46 -> 52 tok/s with spinning; loaded machine 29.6 without, 16.8 with. ``None`` decides from
    ``STILLROOM_ORT_SPIN`` (0/1) if set, else spins only while the 1-minute load average leaves the
    threads their cores.
    """
    if spin is not None:
        return spin
    forced = os.environ.get("STILLROOM_ORT_SPIN", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform
        return False
    return load < physical_cores() - threads + 1


def provider_chain(requested: str, available: list[str], allow_fallback: bool = False) -> list[str]:
    """Short provider names to hand ORT, best first: the requested one (or all for "auto"), then CPU."""
    if requested not in ("auto", *PRIORITY):
        raise StillroomError(f"unknown onnxruntime provider '{requested}'", "use auto, tensorrt, cuda or cpu")
    wanted = PRIORITY if requested == "auto" else (requested, "cpu")
    chain = [name for name in dict.fromkeys(wanted) if PROVIDERS[name] in available]
    if requested != "auto" and requested not in chain and allow_fallback:
        log.warning("onnxruntime provider %s is not available; falling back to %s", requested, chain[0])
    elif requested != "auto" and requested not in chain:
        raise StillroomError(
            f"onnxruntime provider '{requested}' is not available in this onnxruntime build "
            f"(available: {', '.join(available)})",
            "install onnxruntime-gpu (replacing onnxruntime) on a machine with a GPU, or use --provider cpu",
        )
    return chain


def _provider_options(name: str, opts: SessionOptions) -> dict[str, str]:
    if name in GPU_PROVIDERS:
        return {"device_id": str(opts.device_id)}
    return {}


def open_session(path: Path, opts: SessionOptions):
    """An ``InferenceSession`` and the short name of the provider that really runs it.

    The only place that constructs an ``InferenceSession``: every caller gets the same strict
    provider check and the same thread and spin settings.
    """
    import onnxruntime as ort

    chain = provider_chain(opts.provider, ort.get_available_providers(), opts.allow_fallback)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # ORT's default, stated: inter-op 1 relies on it
    if opts.intra_op_threads:
        so.intra_op_num_threads = int(opts.intra_op_threads)
    if opts.inter_op_threads:
        so.inter_op_num_threads = int(opts.inter_op_threads)
    so.log_severity_level = 3
    spin = spin_waiting(opts.spin, opts.intra_op_threads or physical_cores())
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    providers = [(PROVIDERS[n], _provider_options(n, opts)) for n in chain]
    try:
        session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
    except Exception as err:  # ORT raises its own exception types for corrupt or unsupported graphs
        raise StillroomError(
            f"onnxruntime cannot load '{path}': {' '.join(str(err).split())[:300]}",
            "re-run the export, or check the onnxruntime version",
        ) from err
    active = next(k for k, v in PROVIDERS.items() if v == session.get_providers()[0])
    if opts.provider != "auto" and active != opts.provider:
        if not opts.allow_fallback:
            raise StillroomError(
                f"onnxruntime fell back from '{opts.provider}' to '{active}' for '{path}'",
                "check the GPU / CUDA / TensorRT installation, or pass --allow-fallback to accept it",
            )
        log.warning("onnxruntime fell back from %s to %s", opts.provider, active)
    return session, active


ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(double)": np.float64,
    "tensor(bool)": np.bool_,
}


def input_dtypes(sess) -> dict[str, Any]:
    """numpy dtype of every graph input (float32 where ORT's type has no entry in ``ORT_TYPES``)."""
    return {i.name: ORT_TYPES.get(i.type, np.float32) for i in sess.get_inputs()}


def run(sess, feeds: dict[str, Any]) -> list[np.ndarray]:
    """Runs with every feed cast to the dtype the graph declares (fp16 graphs take fp16 inputs)."""
    types = input_dtypes(sess)
    cast = {k: np.ascontiguousarray(np.asarray(v, dtype=types[k])) for k, v in feeds.items() if k in types}
    return sess.run(None, cast)
