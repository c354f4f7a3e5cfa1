"""Flow-matching (velocity) teachers and students: the conversions against hand formulas, the teacher's
Euler sampler against a hand-written one, and a tiny flow teacher through student run -> ONNX export ->
onnxruntime / diffusers / bench."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stillroom.plugins.diffusion import sampler as gen
from stillroom.testing import build_class_teacher

FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}


def build_flow_teacher(root):
    """The tiny class-conditional UNet of the DDPM fixture with a flow-matching scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    build_class_teacher(root)
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).save_pretrained(root / "scheduler")
    return root


@pytest.fixture(scope="module")
def flow_teacher(tmp_path_factory):
    return build_flow_teacher(tmp_path_factory.mktemp("flow_teacher"))


def test_velocity_conversions_match_the_hand_formulas():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 1, 4, 4, generator=g).double(), torch.randn(3, 1, 4, 4, generator=g).double()
    sigma = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64).view(-1, 1, 1, 1)
    x = (1 - sigma) * x0 + sigma * eps  # rectified-flow path
    v = eps - x0
    got_x0, got_eps = gen.to_x0_eps(v, x, 1 - sigma, sigma, "flow")
    assert torch.allclose(got_x0, x0) and torch.allclose(got_eps, eps)
    # the DDIM update on a flow schedule is the Euler step x + (sigma' - sigma) v
    s_next = torch.tensor(0.1, dtype=torch.float64)
    euler = x + (s_next - sigma) * v
    assert torch.allclose(gen.ddim_step(got_x0, got_eps, 1 - s_next, s_next), euler)


def test_flow_schedule_grid_and_coefficients():
    from diffusers import FlowMatchEulerDiscreteScheduler

    a, s = gen.schedule_coefficients(FLOW)
    assert a.shape == (1001,) and torch.allclose(a + s, torch.ones_like(a)) and s[1000] == 1 and a[0] == 1
    assert gen.ddim_timesteps(FLOW, 1) == [1000] and gen.ddim_timesteps(FLOW, 4) == [1000, 750, 500, 250]
    sched = FlowMatchEulerDiscreteScheduler(**{k: v for k, v in FLOW.items() if k != "_class_name"})
    sched.set_timesteps(1)  # diffusers' one-step grid starts at sigma = 1, timestep 1000
    assert float(sched.timesteps[0]) == 1000.0 and float(sched.sigmas[0]) == float(s[1000])
    with pytest.raises(Exception, match="shift"):
        gen.schedule_coefficients({**FLOW, "shift": 3.0})


def test_flow_teacher_samples_with_cfg_euler(flow_teacher):
    from stillroom.plugins.diffusion import models as dm

    teacher = dm.load_teacher(str(flow_teacher))
    assert (
        teacher.prediction == "flow" and type(teacher.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    )
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([3, 7])
    cond, uncond = dm.class_cond(y, teacher.null_class)
    out = dm.teacher_sample(teacher, z, cond, uncond, 3, guidance=1.5)
    # hand-written reference: sigmas 1 -> 2/3 -> 1/3 (+ diffusers' 1/1000 floor) -> 0, Euler with CFG
    sigmas = list(np.linspace(1.0, 1 / 1000, 3)) + [0.0]
    x = z.clone()
    with torch.no_grad():
        for s, s_next in zip(sigmas, sigmas[1:], strict=False):
            t = torch.full((2,), s * 1000)
            v_c = teacher.unet(x, t, class_labels=y).sample
            v_u = teacher.unet(x, t, class_labels=torch.full_like(y, 10)).sample
            x = x + (s_next - s) * (v_u + 1.5 * (v_c - v_u))
    assert torch.allclose(out, x.clamp(-1, 1), atol=1e-5)


def test_flow_student_runs_exports_and_benches(tmp_path, flow_teacher):
    """A flow-map student of the tiny flow teacher: trainer -> ONNX (validated) -> onnxruntime equals
    the torch sampler -> diffusers pipeline validates -> bench's timing and quality run on it."""
    from stillroom.core import recipe as recipes
    from stillroom.core.bench_plan import BenchSettings
    from stillroom.core.trainer import Trainer
    from stillroom.plugins.diffusion.bench import bench, fid_like
    from stillroom.plugins.diffusion.export import export_generator
    from stillroom.plugins.diffusion.export_diffusers import export_diffusers
    from stillroom.plugins.diffusion.runtime import load
    from tests.test_diffusion_fixtures import diffusion_recipe

    data = diffusion_recipe({"name": "flow_map"}, flow_teacher, {"source": "embedded:mnist"}, steps=2)
    student = Trainer(recipes.validate(data), tmp_path / "run").fit()
    sampler = json.loads((student / "stillroom.json").read_text())["sampler"]
    assert sampler["prediction"] == "flow" and sampler["timesteps"] == [1000]

    art = export_generator(student, tmp_path / "onnx")
    assert art.manifest.validation["passed"] and art.manifest.spec["prediction"] == "flow"
    ort_model, torch_model = load("onnxruntime", str(tmp_path / "onnx")), load("torch", str(student))
    noise, labels = ort_model.noise(3, 0), np.array([0, 4, 9])
    np.testing.assert_allclose(
        ort_model.generate(noise, class_labels=labels),
        torch_model.generate(noise, class_labels=labels),
        atol=1e-4,
    )
    folder = export_diffusers(student, tmp_path / "diffusers")
    assert folder.manifest.validation["passed"]
    assert json.loads((tmp_path / "diffusers" / "model_index.json").read_text())["scheduler"][1] == (
        "FlowMatchEulerDiscreteScheduler"
    )
    settings = BenchSettings(batches=[2], warmup=0, repeats=1, quality_samples=4, grid_images=2)
    assert bench(ort_model, {}, settings, tmp_path)["timing"][0]["batch"] == 2
    assert fid_like(ort_model, {}, settings, tmp_path)["quality"]["samples"] == 4
    teacher_model = load("torch", str(flow_teacher), steps=2)  # the teacher itself: Euler through the runtime
    assert np.isfinite(teacher_model.generate(noise, class_labels=labels)).all()
