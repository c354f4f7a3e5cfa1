"""Small onnxruntime helpers shared by the exporters' validation (serve has its own runtime)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(double)": np.float64,
    "tensor(bool)": np.bool_,
}


def session(path: Path, providers: list[str] | None = None):
    """An InferenceSession with a thread count that respects OMP_NUM_THREADS (shared machines)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers or ["CPUExecutionProvider"])


def input_dtypes(sess) -> dict[str, Any]:
    return {i.name: ORT_TYPES.get(i.type, np.float32) for i in sess.get_inputs()}


def run(sess, feeds: dict[str, Any]) -> list[np.ndarray]:
    """Runs with every feed cast to the dtype the graph declares (fp16 graphs take fp16 inputs)."""
    types = input_dtypes(sess)
    cast = {k: np.ascontiguousarray(np.asarray(v, dtype=types[k])) for k, v in feeds.items() if k in types}
    return sess.run(None, cast)
