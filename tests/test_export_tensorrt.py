"""TensorRT: CPU-side parts (profiles, cache keys, precision conversion); the engine build needs a GPU."""

from __future__ import annotations

import numpy as np
import pytest

from stillroom.core import artifact
from stillroom.core.errors import StillroomError
from stillroom.export import tensorrt


def _specs():
    return [
        artifact.TensorSpec(name="input_ids", dtype="int64", shape=["batch_size", "sequence_length"]),
        artifact.TensorSpec(
            name="past_key_values.0.key", dtype="float32", shape=["batch_size", 2, "past_sequence_length", 8]
        ),
    ]


def test_profiles_from_manifest_dims_and_overrides():
    profiles = tensorrt.derive_profiles(_specs(), tensorrt.parse_profiles(["batch_size=2:3:5"]))
    assert profiles["input_ids"] == {"min": [2, 1], "opt": [3, 64], "max": [5, 256]}
    assert profiles["past_key_values.0.key"] == {
        "min": [2, 2, 0, 8],
        "opt": [3, 2, 64, 8],
        "max": [5, 2, 256, 8],
    }
    with pytest.raises(StillroomError, match="MIN <= OPT <= MAX"):
        tensorrt.parse_profiles(["batch_size=4:2:8"])
    with pytest.raises(StillroomError, match="unknown dims"):
        tensorrt.derive_profiles(_specs(), {"height": (1, 2, 3)})


def test_engine_cache_key_changes_with_every_component():
    profiles = tensorrt.derive_profiles(_specs())
    base = ("a" * 64, "10.13.0", (9, 0), profiles, "fp16")
    key = tensorrt.engine_cache_key(*base)
    assert key == tensorrt.engine_cache_key(*base)
    other_profiles = tensorrt.derive_profiles(_specs(), {"batch_size": (1, 2, 4)})
    for i, change in enumerate(["b" * 64, "10.14.0", (8, 9), other_profiles, "fp32"]):
        changed = list(base)
        changed[i] = change
        assert tensorrt.engine_cache_key(*changed) != key


def _tiny_onnx_artifact(root):
    import onnx
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], np.linspace(-1, 1, 12).astype(np.float32).tolist())
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch_size", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch_size", 3])],
        [w],
    )
    root.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(root / "model.onnx"))
    artifact.write_manifest(
        root,
        artifact.Manifest(
            kind="generator",
            graphs={"model": "model.onnx"},
            inputs=[{"name": "x", "dtype": "float32", "shape": ["batch_size", 4]}],
            outputs=[{"name": "y", "dtype": "float32", "shape": ["batch_size", 3]}],
        ),
    )
    return artifact.load(root)


def test_precision_conversion_makes_a_float16_graph(tmp_path):
    import onnx
    import onnxruntime as ort

    art = _tiny_onnx_artifact(tmp_path / "art")
    assert tensorrt.graph_for_precision(art, "fp32", tmp_path) == art.graph()
    fp16 = tensorrt.graph_for_precision(art, "fp16", tmp_path)
    model = onnx.load(str(fp16))
    assert {i.data_type for i in model.graph.initializer} == {onnx.TensorProto.FLOAT16}
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    (y,) = ort.InferenceSession(str(fp16), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    ref = x.astype(np.float64) @ np.linspace(-1, 1, 12).reshape(4, 3)
    np.testing.assert_allclose(y, ref, atol=2e-2)
    with pytest.raises(StillroomError, match="int8"):
        tensorrt.graph_for_precision(art, "int8", tmp_path)


def test_without_gpu_or_tensorrt_one_clear_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(StillroomError, match="pip install") as err:
        tensorrt.require()
    assert "\n" not in str(err.value)


@pytest.mark.gpu
def test_engine_matches_ort(tmp_path, monkeypatch):
    pytest.importorskip("tensorrt")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    monkeypatch.setenv("STILLROOM_CACHE", str(tmp_path / "cache"))
    art = _tiny_onnx_artifact(tmp_path / "art")
    for precision in ("fp32", "fp16"):
        engine = tensorrt.build(art, tmp_path / f"trt-{precision}", precision=precision)
        assert engine.manifest.format == "tensorrt" and engine.manifest.validation["passed"]
        assert engine.manifest.extra["engine_cache_hit"] is False
        again = tensorrt.build(art, tmp_path / f"trt2-{precision}", precision=precision)
        assert again.manifest.extra["engine_cache_hit"] is True
