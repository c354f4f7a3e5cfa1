"""How fast ONNX Runtime's fp32 MatMul reads weights at batch 1, against the machine's read bandwidth.

A decode step of a 135M-parameter fp32 LM is ~150 MatMuls of one activation row against a weight
matrix, so its speed limit on ORT is the rate at which that kernel streams weights, not the
machine's bandwidth. This builds a graph of nothing but such MatMuls (576 x 1536 and back, SmolLM2-135M
shapes, ~530 MB of weights) and reports GB/s of weights read per run, next to a plain streaming read
(``torch.sum`` over 1 GiB) on the same threads:

    python benchmarks/ort_matmul_bandwidth.py [--threads 2] [--layers 150]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def matmul_chain(path: Path, layers: int, k: int = 576, n: int = 1536) -> int:
    """Writes the graph; returns the weight bytes one run reads."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        shape = (k, n) if i % 2 == 0 else (n, k)
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * 0.03).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"y{i}"]))
        x = f"y{i}"
    last = k if layers % 2 == 0 else n
    graph = helper.make_graph(
        nodes,
        "matmul_chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, last])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")
    return layers * k * n * 4


def best_seconds(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=150)
    args = ap.parse_args()
    import onnxruntime as ort
    import torch

    torch.set_num_threads(args.threads)
    buf = torch.ones(256 << 20)
    read = buf.numel() * 4 / best_seconds(buf.sum, 5) / 1e9
    del buf
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "chain.onnx"
        weight_bytes = matmul_chain(path, args.layers)
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "1")
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        x = {"x": np.ones((1, 576), np.float32)}
        matmul = weight_bytes / best_seconds(lambda: session.run(None, x), 20) / 1e9
    print(
        f"threads {args.threads}: torch.sum read {read:.1f} GB/s; ORT fp32 MatMul (batch 1) "
        f"{matmul:.1f} GB/s of weights = {100 * matmul / read:.0f}% of the read bandwidth"
    )


if __name__ == "__main__":
    main()
