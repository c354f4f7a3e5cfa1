"""What an equation-by-equation review of the diffusion methods found untested or wrong, each pinned by
a test that fails on the old code: VSD's update direction, DMD2's critic (raw prediction, full t range,
repeats), iCT's pseudo-Huber, the consistency EMA-target pairing, progressive's hand-off between
rounds, the hybrid sampler's handover, and the boundary / hybrid export paths."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from stillroom.core import recipe as recipes
from stillroom.core.errors import StillroomError
from stillroom.core.host import get_host
from stillroom.core.method import Context
from stillroom.core.trainer import Trainer
from stillroom.plugins.diffusion import sampler as gen
from stillroom.plugins.diffusion.methods.consistency import pseudo_huber
from stillroom.testing import build_tiny_generator
from tests.test_diffusion_fixtures import diffusion_recipe


def build(name, teacher, folder, tmp_path, params=None, student=None, **train):
    """A built method (roles made, as the trainer makes them) and a batch of its data."""
    data = diffusion_recipe(
        {"name": name, **(params or {})}, teacher, {"source": str(folder)}, student, **train
    )
    method = get_host().method(name)(
        recipes.validate(data), Context(torch.device("cpu"), torch.float32, tmp_path)
    )
    method.roles = method.build()
    ds = method.dataset()
    return method, method.collate([ds[i] for i in range(4)])


class Output:
    def __init__(self, sample):
        self.sample = sample


class GaussianEps(torch.nn.Module):
    """The exact epsilon-prediction for data N(mu, 1) under x_t = a x0 + s eps: E[eps | x_t] =
    s (x_t - a mu) / (a^2 + s^2), whatever the labels (so CFG changes nothing)."""

    def __init__(self, abar: torch.Tensor, mu: float | torch.Tensor) -> None:
        super().__init__()
        self.abar, self.mu = abar, mu

    def forward(self, x, t, **_):
        a, s = self.abar[t].sqrt().view(-1, 1, 1, 1), (1 - self.abar[t]).sqrt().view(-1, 1, 1, 1)
        return Output(s * (x - a * self.mu) / (a**2 + s**2))


# -- VSD: the student moves toward the teacher's distribution --------------------------------------
def test_vsd_student_step_lowers_the_kl_to_the_teacher(class_teacher, label_folder, tmp_path):
    """Teacher = exact score of N(mu=0.5, 1), critic = exact score of the student's N(theta, 1), so
    KL(q || p) = (theta - mu)^2 / 2 per pixel; VSD's gradient must make SGD on theta lower it."""
    method, batch = build("vsd", class_teacher, label_folder, tmp_path, {"critic": "copy"})
    mu, theta = 0.5, torch.tensor(-0.5, requires_grad=True)
    method.teacher.unet = GaussianEps(method.abar, mu)
    torch.manual_seed(0)
    kl = []
    for _ in range(5):
        method.critic = GaussianEps(method.abar, theta.detach())
        z = torch.randn(8, 1, 8, 8)
        method.student_sample = lambda batch, k, z=z, theta=theta: (theta + z, 0)
        theta.grad = None
        method.student_loss(batch).loss.backward()
        assert torch.sign(theta.grad) == torch.sign(theta.detach() - mu)  # descent moves theta toward mu
        with torch.no_grad():
            theta -= 2.0 * theta.grad
        kl.append(float((theta.detach() - mu) ** 2 / 2))
    assert kl == sorted(kl, reverse=True) and kl[-1] < 0.5 * 0.5, kl  # (-0.5 - 0.5)^2 / 2 = 0.5 at start


# -- DMD2's critic ---------------------------------------------------------------------------------------
def test_dmd2_critic_loss_is_the_raw_denoising_loss_at_any_t(class_teacher, label_folder, tmp_path):
    method, batch = build("dmd2", class_teacher, label_folder, tmp_path)
    assert method.clip_x0 == 1.0 and method.teacher.prediction == "epsilon"  # the clamp is in play
    torch.manual_seed(3)
    loss = method.critic_loss(batch).loss
    torch.manual_seed(3)  # the same draws, followed by hand: sample, t ~ U{0..T-1}, eps, raw eps_fake
    with torch.no_grad():
        x, _ = method.student_sample(batch)
    t = torch.randint(0, method.T, (x.shape[0],))
    eps = torch.randn_like(x)
    a, s = method.abar[t].sqrt().view(-1, 1, 1, 1), (1 - method.abar[t]).sqrt().view(-1, 1, 1, 1)
    x_t = a * x + s * eps
    raw = method.critic(x_t, t, class_labels=batch["cond"]["class_labels"]).sample
    torch.testing.assert_close(loss, F.mse_loss(raw, eps))
    clamped_x0 = ((x_t - s * raw) / a).clamp(-1, 1)
    clamped = F.mse_loss((x_t - a * clamped_x0) / s, eps)
    assert not torch.isclose(loss, clamped)  # the old loss, through the teacher's clamp, differs here
    loss.backward()
    assert all(p.grad is not None for p in method.critic.parameters() if p.requires_grad)


def test_dmd2_draws_the_critics_t_over_the_whole_range_and_the_generators_inside(
    class_teacher, label_folder, tmp_path
):
    method, _ = build("dmd2", class_teacher, label_folder, tmp_path)
    critic, generator = method.critic_t(20000, "cpu"), method.random_t(20000, "cpu")
    assert critic.min() < 0.02 * method.T and critic.max() > 0.98 * method.T
    assert generator.min() >= 0.02 * method.T and generator.max() < 0.98 * method.T


def test_dmd2_steps_the_critic_critic_updates_times_per_generator_step(
    class_teacher, label_folder, tmp_path, monkeypatch
):
    from stillroom.plugins.diffusion.methods.dmd2 import DMD2

    calls = {"critic": 0, "student": 0}
    for role, fn in (("critic", DMD2.critic_loss), ("student", DMD2.generator_loss)):
        monkeypatch.setattr(
            DMD2,
            fn.__name__,
            lambda self, batch, fn=fn, role=role: calls.__setitem__(role, calls[role] + 1) or fn(self, batch),
        )
    data = diffusion_recipe(
        {"name": "dmd2", "critic_updates": 3}, class_teacher, {"source": str(label_folder)}, steps=2
    )
    Trainer(recipes.validate(data), tmp_path / "run").fit()
    assert calls == {"critic": 6, "student": 2}


# -- consistency --------------------------------------------------------------------------------------
def test_pseudo_huber_is_icts_per_sample_vector_norm():
    a, b = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    norms = np.sqrt(((a - b).numpy() ** 2).reshape(3, -1).sum(1))
    c = 0.00054 * np.sqrt(64)
    assert float(pseudo_huber(a, b)) == pytest.approx(np.mean(np.sqrt(norms**2 + c**2) - c), rel=1e-6)
    assert float(pseudo_huber(a, b, 0.1)) == pytest.approx(np.mean(np.sqrt(norms**2 + 0.01) - 0.1), rel=1e-6)
    tiny = b + 1e-4  # well below c: quadratic, ||d||^2 / (2c)
    assert float(pseudo_huber(tiny, b)) == pytest.approx(64e-8 / (2 * c), rel=1e-2)


def test_consistency_pairs_the_online_net_at_t_with_the_ema_target_one_solver_step_below(
    class_teacher, label_folder, tmp_path
):
    method, batch = build(
        "consistency", class_teacher, label_folder, tmp_path, {"ddim_steps": 10, "target_ema": 0.9}
    )
    calls = []
    original = method.consistency_fn

    def record(unet, x, t, e, cond, embed):
        calls.append((unet, t.clone(), e.clone()))
        return original(unet, x, t, e, cond, embed)

    method.consistency_fn = record
    method.loss("student", batch, 0)
    (target_net, t_prev, e_target), (online_net, t, e_online) = calls  # the target is computed first
    assert target_net is method.target and online_net is method.student
    step = method.T // 10
    torch.testing.assert_close(t_prev, torch.clamp(t - step, min=0))  # x_hat_{t_n} from x_{t_{n+1}}
    torch.testing.assert_close(e_target, e_online)

    before = [p.detach().clone() for p in method.target.parameters()]
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(0.01)
    method.after_step(0, {})
    for old, new, student in zip(
        before, method.target.parameters(), method.student.parameters(), strict=True
    ):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * student)  # theta- <- mu theta- + (1 - mu) theta


# -- progressive: round r's teacher is round r-1's student ------------------------------------------------
def test_progressive_hands_the_student_over_as_the_next_rounds_teacher(class_teacher, label_folder, tmp_path):
    method, batch = build(
        "progressive", class_teacher, label_folder, tmp_path, {"start_steps": 4, "steps_per_round": 1}
    )
    assert method.round == 0 and method.rounds == 2
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(0.05)
    method.after_step(0, {})
    assert method.round == 1 and len(method.schedule()[0]) == 1
    for prev, student in zip(method.previous.parameters(), method.student.parameters(), strict=True):
        torch.testing.assert_close(prev, student)
    with torch.no_grad():
        next(method.student.parameters()).add_(1.0)  # the snapshot is a copy, not the live student
    assert not torch.equal(next(method.previous.parameters()), next(method.student.parameters()))

    def refuse(*args, **kwargs):
        raise AssertionError("round 1 must not call the original teacher")

    method.teacher.unet.forward = refuse
    assert torch.isfinite(method.loss("student", batch, 1).loss)


# -- the hybrid sampler hands over where the student was trained ------------------------------------
def test_hybrid_handover_defaults_to_a_trained_timestep_and_refuses_an_untrained_one(
    class_teacher, label_folder, tmp_path
):
    two = {"steps": 2, "hybrid_teacher_steps": 1}
    method, _ = build("progressive", class_teacher, label_folder, tmp_path, {"start_steps": 4}, two)
    timesteps = method.schedule()[0]
    assert method.sampler()["hybrid"]["handover"] == timesteps[1]
    with pytest.raises(StillroomError, match="1 step, trained at t=999 only"):
        build(
            "dmd2",
            class_teacher,
            label_folder,
            tmp_path / "one",
            None,
            {"steps": 1, "hybrid_teacher_steps": 1},
        )
    with pytest.raises(StillroomError, match="hybrid handover 750 is not a timestep the student was trained"):
        build(
            "progressive", class_teacher, label_folder, tmp_path / "untrained", {"start_steps": 4},
            {**two, "hybrid_handover": 750},
        )  # fmt: skip


# -- export of boundary and hybrid samplers -----------------------------------------------------------
def _with_sampler(student, change):
    card = json.loads((student / "stillroom.json").read_text())
    card["sampler"] = change(card["sampler"])
    (student / "stillroom.json").write_text(json.dumps(card))
    return card["sampler"]


@pytest.mark.parametrize("kind", ["boundary", "hybrid"])
def test_boundary_and_hybrid_samplers_export_and_validate(kind, class_teacher, tmp_path):
    from stillroom.plugins.diffusion.export import export_generator
    from stillroom.plugins.diffusion.spec import spec_of

    student = build_tiny_generator(tmp_path / "s", steps=2)
    if kind == "boundary":
        sampler = _with_sampler(
            student,
            lambda s: {
                **s,
                "boundary": {"sigma_data": 0.5, "timestep_scaling": 10.0, "ends": [s["timesteps"][1], 0]},
            },
        )
    else:
        sampler = _with_sampler(
            student,
            lambda s: gen.with_hybrid(s, str(class_teacher), 1000, 2, s["timesteps"][1], 2.0, "epsilon", 1.0),
        )
    art = export_generator(student, tmp_path / "art")
    spec = spec_of(art.manifest)
    assert art.manifest.validation["passed"] and spec.timesteps == sampler["timesteps"]
    if kind == "boundary":
        assert spec.boundary.ends == sampler["boundary"]["ends"]
    else:
        assert spec.hybrid.teacher == str(class_teacher) and spec.hybrid.timesteps == [999, 749]
