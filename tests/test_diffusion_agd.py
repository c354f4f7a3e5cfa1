"""Adapter guidance distillation: the objective against a hand-written CFG target, the adapted UNet's
identities (w = 1 is the conditional teacher, zero-initialised adapters change nothing), a short run that
brings one forward pass closer to CFG, and the student's sampler (one UNet call per step, w an input)
through ONNX export."""

from __future__ import annotations

import torch

from stillroom.core import recipe as recipes
from stillroom.core.host import get_host
from stillroom.core.method import Context
from stillroom.core.trainer import Trainer
from stillroom.plugins.diffusion import models as dm
from stillroom.plugins.diffusion import sampler as gen
from stillroom.plugins.diffusion.datafree import TeacherTrajectories
from stillroom.plugins.diffusion.guidance_adapter import GuidanceAdaptedUNet, guidance_minus_one
from tests.test_diffusion_fixtures import diffusion_recipe


def agd(teacher, tmp_path, steps=2, **params):
    data = diffusion_recipe({"name": "agd", "trajectory_steps": 8, **params}, teacher, {}, {"steps": steps})
    method = get_host().method("agd")(
        recipes.validate(data), Context(torch.device("cpu"), torch.float32, tmp_path)
    )
    method.roles = method.build()
    ds = method.dataset()
    return method, method.collate([ds[i] for i in range(4)])


def test_guidance_scale_is_read_back_from_its_embedding():
    w = torch.tensor([1.0, 1.25, 2.0, 4.0, 9.0, 15.5])
    for dim in (8, 32):
        assert torch.allclose(guidance_minus_one(gen.guidance_embedding(w, dim)), w - 1, atol=2e-6)


def test_adapted_unet_is_the_conditional_teacher_at_w_1_and_before_training(class_teacher):
    base = dm.load_teacher(str(class_teacher)).unet
    abar = gen.alphas_cumprod(dm.load_teacher(str(class_teacher)).scheduler.config)
    model = GuidanceAdaptedUNet(base, abar, rank=4, embed_dim=16)
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([999, 500, 10]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        plain = base(x, t, class_labels=y).sample
        for w in (1.0, 3.0):  # zero-initialised up-projections: no offset at any w
            e = gen.guidance_embedding(torch.full((3,), w), 16)
            assert torch.equal(model.guided(x, t, e, class_labels=y), plain)
        for p in model.adapters.parameters():
            torch.nn.init.normal_(p, std=0.3)
        at = {
            w: model.guided(x, t, gen.guidance_embedding(torch.full((3,), w), 16), class_labels=y)
            for w in (1.0, 3.0)
        }
    assert torch.allclose(at[1.0], plain, atol=1e-6) and not torch.allclose(at[3.0], plain, atol=1e-3)
    assert torch.equal(base(x, t, class_labels=y).sample, plain), (
        "outside guided() the base UNet is untouched"
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < trainable < sum(p.numel() for p in base.parameters())


def test_agd_loss_regresses_one_pass_onto_two_pass_cfg_at_trajectory_states(class_teacher, tmp_path):
    method, batch = agd(class_teacher, tmp_path)
    torch.manual_seed(0)
    x, t, cond, _, w = (v.clone() if torch.is_tensor(v) else v for v in method.trajectories.current(batch))
    got = method.loss("student", batch, 0).loss
    labels = cond["class_labels"]
    with torch.no_grad():
        c = method.teacher.unet(x, t, class_labels=labels).sample
        u = method.teacher.unet(x, t, class_labels=torch.full_like(labels, 10)).sample
        target = u + w.view(-1, 1, 1, 1) * (c - u)
        pred = method.student.guided(x, t, gen.guidance_embedding(w, 32), class_labels=labels)
    assert torch.allclose(got, ((pred - target) ** 2).mean(), rtol=1e-5)
    assert ((w >= 1.0) & (w <= 4.0)).all()


def test_trained_adapters_sample_with_one_unet_call_per_step_and_export(class_teacher, tmp_path):
    from stillroom.plugins.diffusion.export import export_generator
    from stillroom.plugins.diffusion.sampler import load_generator
    from stillroom.plugins.diffusion.spec import spec_of

    data = diffusion_recipe(
        {"name": "agd", "trajectory_steps": 8},
        class_teacher,
        {},
        {"steps": 3},
        steps=40,
        lr=3e-3,
        batch_size=8,
    )
    student = Trainer(recipes.validate(data), tmp_path / "run").fit()
    g = load_generator(student)
    teacher = dm.load_teacher(str(class_teacher))

    # one pass closer to CFG than the conditional teacher is, on held-out guided-trajectory states
    method, batch = agd(class_teacher, tmp_path / "held_out")
    torch.manual_seed(123)
    held = TeacherTrajectories(
        method, gen.ddim_timesteps(teacher.scheduler.config, 8), lambda b: torch.full((b,), 3.0)
    )
    errors = {"trained": 0.0, "conditional": 0.0}
    for _ in range(6):
        x, t, cond, uncond, w = held.current(batch)
        with torch.no_grad():
            target = dm.cfg_output(teacher.unet, x, t, cond, uncond, w)
            trained = g.unet.guided(x, t, gen.guidance_embedding(w, 32), **cond)
        errors["trained"] += ((trained - target) ** 2).mean().item()
        errors["conditional"] += ((teacher.unet(x, t, **cond).sample - target) ** 2).mean().item()
        held.advance()
    assert errors["trained"] < 0.9 * errors["conditional"], errors  # 0.75 measured; untrained: 1.0

    # the sampler: guidance is an input, one UNet evaluation per DDIM step, and w = 1 is the teacher's DDIM
    calls = []
    g.unet.base.register_forward_pre_hook(lambda *a: calls.append(1))
    noise, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 3, 5, 9])
    with torch.no_grad():
        at_1 = g(noise, labels, guidance_scale=1.0)
        assert len(calls) == 3
        at_3 = g(noise, labels, guidance_scale=3.0)
    cond, uncond = dm.class_cond(labels, 10)
    # w = 1: no adapter offset, so the teacher's own clipped DDIM (float32 rounding at alpha_999 = 0.006)
    assert torch.allclose(at_1, dm.teacher_sample(teacher, noise, cond, uncond, 3, None), atol=1e-2)
    assert not torch.allclose(at_1, at_3, atol=1e-3)

    art = export_generator(student, tmp_path / "art")
    spec = spec_of(art.manifest)
    assert art.manifest.validation["passed"] and spec.guidance_embed and spec.guidance == 2.0
    assert spec.steps == 3 and "guidance_scale" in [i.name for i in art.manifest.inputs]
