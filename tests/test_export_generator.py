"""Generator export: the K-step sampler unrolled into one validated graph; broken exports fail."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from stillroom.core.errors import StillroomError
from stillroom.testing import build_tiny_generator


def _export(tmp_path, steps: int, conditioning: str | None):
    from stillroom.plugins.diffusion.export import export_generator

    student = build_tiny_generator(tmp_path / "student", steps=steps, conditioning=conditioning)
    return student, export_generator(student, tmp_path / "art")


def test_one_step_class_conditional_generator(tmp_path):
    import onnxruntime as ort

    from stillroom.plugins.diffusion.sampler import load_generator

    student, art = _export(tmp_path, 1, "class")
    m = art.manifest
    assert m.kind == "generator" and m.exporter == "dynamo" and m.validation["passed"]
    assert [(i.name, i.dtype, i.shape) for i in m.inputs] == [
        ("noise", "float32", ["batch_size", 1, 8, 8]),
        ("class_labels", "int64", ["batch_size"]),
    ]
    assert m.outputs[0].name == "image" and m.spec["steps"] == 1 and m.spec["timesteps"] == [999]
    # independent reference: the PyTorch sampler in float64 on a batch size validation did not use
    gen = load_generator(student).double()
    rng = np.random.default_rng(3)
    noise = rng.standard_normal((5, 1, 8, 8)).astype(np.float32)
    labels = rng.integers(0, 10, size=5).astype(np.int64)
    sess = ort.InferenceSession(str(art.graph()), providers=["CPUExecutionProvider"])
    (image,) = sess.run(None, {"noise": noise, "class_labels": labels})
    with torch.no_grad():
        ref = gen(torch.from_numpy(noise).double(), class_labels=torch.from_numpy(labels)).numpy()
    assert image.shape == (5, 1, 8, 8)
    np.testing.assert_allclose(image, ref, atol=1e-4)


class DataDependent(nn.Module):
    """Python control flow on a tensor value: the trace bakes in one branch and one constant."""

    def __init__(self, generator: nn.Module) -> None:
        super().__init__()
        self.unet, self.sampler = generator.unet, generator.sampler
        self.conditioning, self.guidance = None, None

    def forward(self, noise, class_labels=None, encoder_hidden_states=None, guidance_scale=None):
        scale = float(noise.abs().max())
        if float(noise.mean()) > 0:
            return noise / scale
        return -noise / scale


def test_broken_export_fails_validation_without_manifest(tmp_path):
    from stillroom.plugins.diffusion.export import export_generator_module
    from stillroom.plugins.diffusion.sampler import load_generator

    student = build_tiny_generator(tmp_path / "student", steps=1, conditioning=None)
    out = tmp_path / "art"
    with pytest.raises(StillroomError, match="failed validation: max_abs_diff=") as err:
        export_generator_module(DataDependent(load_generator(student)), out)
    assert "no manifest" in str(err.value)
    assert not (out / "manifest.json").exists() and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".art.")]  # staging removed


@pytest.mark.slow
@pytest.mark.parametrize("steps,conditioning", [(2, "class"), (4, "class"), (2, None), (2, "text")])
def test_multi_step_and_text_generators(tmp_path, steps, conditioning):
    _, art = _export(tmp_path, steps, conditioning)
    m = art.manifest
    assert m.validation["passed"] and m.spec["steps"] == steps and len(m.spec["timesteps"]) == steps
    if conditioning == "text":
        assert set(m.graphs) == {"model", "text_encoder"} and m.tokenizer == "tokenizer"
        assert m.inputs[1].name == "encoder_hidden_states"
        assert m.validation["stages"]["text_encoder"]["passed"]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["int8", "fp16"])
def test_generator_variants(tmp_path, variant):
    from stillroom.plugins.diffusion.export import export_generator

    student = build_tiny_generator(tmp_path / "student", steps=2, conditioning="class")
    art = export_generator(student, tmp_path / "art", **{variant: True})
    v = art.manifest.validation
    assert (
        art.manifest.precision == variant and v["passed"] and v["psnr_db"] >= v["thresholds"]["min_psnr_db"]
    )


def test_int8_generator_quantizes_its_convolutions(tmp_path):
    """int8 covers the UNet's convolutions (static QDQ or dynamic ConvInteger), as the manifest counts."""
    import onnx

    from stillroom.plugins.diffusion.export import export_generator

    student = build_tiny_generator(tmp_path / "s", steps=2, size=28)
    art = export_generator(student, tmp_path / "art", int8=True)
    m = art.manifest
    assert m.precision == "int8" and m.validation["passed"]
    assert m.validation["psnr_db"] >= m.validation["thresholds"]["min_psnr_db"]
    graph = onnx.load(str(art.graph())).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    qdq_convs = sum(n.op_type == "Conv" and n.input[1] in dequantized for n in graph.node)
    conv_integer = sum(n.op_type == "ConvInteger" for n in graph.node)
    assert m.extra["int8_method"] == ("static-qdq" if qdq_convs else "dynamic")
    assert qdq_convs + conv_integer == m.extra["int8_ops"]["Conv"]["int8"] > 0
    assert m.extra["int8_ops"]["Conv"]["total"] == sum(
        n.op_type in ("Conv", "ConvInteger") for n in graph.node
    )
