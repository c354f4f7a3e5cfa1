"""The data-free diffusion methods (BOOT, TBCM; AGD in test_diffusion_agd.py): their objectives against
independent computations, the teacher trajectories against diffusers' DDIM, no image ever read, and a
tiny end-to-end run to a loadable generator."""

from __future__ import annotations

import json

import pytest
import torch

from stillroom.core import recipe as recipes
from stillroom.core.host import get_host
from stillroom.core.method import Context
from stillroom.core.trainer import Trainer
from stillroom.plugins.diffusion import data as diffusion_data
from stillroom.plugins.diffusion import models as dm
from stillroom.plugins.diffusion.datafree import TeacherTrajectories
from stillroom.plugins.diffusion.methods.boot import boot_delta, boot_grid, signal_step
from stillroom.plugins.diffusion.methods.tbcm import normalized_tangent
from stillroom.plugins.diffusion.sampler import load_generator
from tests.test_diffusion_fixtures import diffusion_recipe


def built(name, teacher, tmp_path, params=None, steps=1):
    """A built data-free method (roles made) and one batch of its conditions."""
    data = diffusion_recipe({"name": name, **(params or {})}, teacher, {}, {"steps": steps})
    method = get_host().method(name)(
        recipes.validate(data), Context(torch.device("cpu"), torch.float32, tmp_path)
    )
    method.roles = method.build()
    ds = method.dataset()
    return method, method.collate([ds[i] for i in range(4)])


def test_signal_step_is_one_teacher_ddim_step_with_the_noise_cancelled():
    """BOOT's signal-space step y_s = y_t + delta (x0_hat - y_t) is (x_s - sigma_s eps) / alpha_s of DDIM."""
    g = torch.Generator().manual_seed(0)
    y_t, x0_hat, eps = (torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    lam_t, lam_s = torch.tensor(1.3, dtype=torch.float64), torch.tensor(-0.4, dtype=torch.float64)
    a_t, s_t = (
        torch.sigmoid(-2 * lam_t).sqrt(),
        torch.sigmoid(2 * lam_t).sqrt(),
    )  # lambda = log(sigma / alpha)
    a_s, s_s = torch.sigmoid(-2 * lam_s).sqrt(), torch.sigmoid(2 * lam_s).sqrt()
    x_t = a_t * y_t + s_t * eps
    x_s = a_s * x0_hat + s_s * (x_t - a_t * x0_hat) / s_t
    delta = boot_delta(a_t, s_t, a_s, s_s)
    assert torch.allclose(delta, 1 - torch.exp(lam_s - lam_t))
    assert torch.allclose(signal_step(y_t, x0_hat, delta), (x_s - s_s * eps) / a_s)
    assert boot_grid(1000, 4) == [999, 749, 500, 250, 0]


def test_boot_loss_is_the_bootstrap_plus_boundary_objective(class_teacher, tmp_path):
    method, batch = built("boot", class_teacher, tmp_path, {"grid_steps": 8, "boundary_weight": 0.5})
    torch.manual_seed(3)
    got = method.loss("student", batch, 0).loss
    torch.manual_seed(3)
    b, labels = 4, batch["cond"]["class_labels"]
    eps = torch.randn(b, 1, 8, 8)
    n = torch.randint(0, 8, (b,))
    grid = torch.tensor([round(999 * (8 - i) / 8) for i in range(9)])
    t, s = grid[n], grid[n + 1]
    abar = method.abar.double()

    def teacher_x0(x, tt):  # CFG as two separate calls, x0 clipped to [-1, 1] (the tiny teacher's clip)
        c = method.teacher.unet(x, tt, class_labels=labels).sample
        u = method.teacher.unet(x, tt, class_labels=torch.full_like(labels, 10)).sample
        e = u + 2.0 * (c - u)
        ab = abar[tt].view(-1, 1, 1, 1).float()
        return ((x - (1 - ab).sqrt() * e) / ab.sqrt()).clamp(-1, 1)

    with torch.no_grad():
        lam = lambda tt: torch.log((1 - abar[tt]).sqrt() / abar[tt].sqrt()).view(-1, 1, 1, 1)  # noqa: E731
        delta = (1 - torch.exp(lam(s) - lam(t))).float()
        y_t = method.student(eps, t, class_labels=labels).sample
        ab_t = abar[t].view(-1, 1, 1, 1).float()
        x_t = ab_t.sqrt() * y_t + (1 - ab_t).sqrt() * eps
        target = (1 - delta) * y_t + delta * teacher_x0(x_t, t)
        top = torch.full_like(t, 999)
        boundary_target = teacher_x0(eps, top)
        pred_s = method.student(eps, s, class_labels=labels).sample
        pred_top = method.student(eps, top, class_labels=labels).sample
    bootstrap = (((pred_s - target) ** 2).flatten(1).mean(1) / delta.flatten() ** 2).mean()
    want = bootstrap + 0.5 * ((pred_top - boundary_target) ** 2).mean()
    assert torch.allclose(got, want, rtol=1e-4), (got, want)


def test_trajectories_are_the_teachers_guided_ddim_sampler(class_teacher, tmp_path):
    """Slots advanced from pure noise land where diffusers' DDIMScheduler (trailing, clipped) lands."""
    from stillroom.plugins.diffusion import sampler as gen

    method, batch = built("agd", class_teacher, tmp_path)
    grid = gen.ddim_timesteps(method.teacher.scheduler.config, 5)
    traj = TeacherTrajectories(method, grid, lambda b: torch.full((b,), 2.5))
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    traj.x, traj.k, traj.w = noise.clone(), torch.zeros(4, dtype=torch.long), torch.full((4,), 2.5)
    traj.cond, traj.uncond = batch["cond"], batch["uncond"]
    for _ in range(5):
        x, t = traj.advance()
    ref = dm.teacher_sample(method.teacher, noise, batch["cond"], batch["uncond"], 5, 2.5)
    assert int(t[0]) == -1 and torch.allclose(x, ref, atol=1e-5)


def test_trajectories_stagger_then_restart_finished_slots_from_noise(class_teacher, tmp_path):
    method, batch = built("agd", class_teacher, tmp_path, {"trajectory_steps": 4})
    traj = method.trajectories
    torch.manual_seed(0)
    seen = []
    for _ in range(6):
        _, t, _, _, w = traj.current(batch)
        seen.append(t.clone())
        traj.advance()
    ts = torch.stack(seen)
    assert len(set(ts[0].tolist())) > 1, "slots start at different points of the grid"
    assert (ts == 999).sum() >= 4 and (ts >= 0).all(), "every slot restarts at T - 1 after the clean end"
    assert ((w >= 1.0) & (w <= 4.0)).all()


def test_normalized_tangent_is_the_finite_difference_over_its_norm_plus_c():
    f_t, f_s = torch.randn(2, 1, 3, 3), torch.randn(2, 1, 3, 3)
    dt = torch.tensor([0.1, 0.5])
    g = normalized_tangent(f_t, f_s, dt, 0.1)
    for i in range(2):
        raw = (f_t[i] - f_s[i]) / dt[i]
        assert torch.allclose(g[i], raw / (raw.norm() + 0.1))


def test_tbcm_gradient_is_twice_the_snr_weighted_normalised_tangent_on_a_trajectory_pair(
    class_teacher, tmp_path, monkeypatch
):
    """sCM's surrogate: d L / d f_theta(x_t, t) = 2 w(t) g_hat, with (x_t, x_s) one teacher step apart and
    w(t) = 1 / (sigma_d tan(tau)) = sqrt(abar_t / (1 - abar_t)), sCM's prior weighting on a VP schedule."""
    method, batch = built("tbcm", class_teacher, tmp_path, {"ddim_steps": 10})
    x_t, t, cond, *_ = method.trajectories.current(batch)
    x_t, t = x_t.clone(), t.clone()
    captured = {}
    real_fn = type(method).consistency_fn

    def spy(self, unet, x, tt, e, c, embed):
        out = real_fn(self, unet, x, tt, e, c, embed)
        if out.requires_grad:
            out.retain_grad()
            captured["f"] = out
        else:
            captured["f_s"], captured["x_s"], captured["s"] = out, x, tt
        return out

    monkeypatch.setattr(type(method), "consistency_fn", spy)
    method.loss("student", batch, 0).loss.backward()
    x0, eps = method.x0_eps(method.teacher.unet, x_t, t, cond, batch["uncond"], 2.0)
    a, s = method.coeffs(captured["s"])
    assert (captured["s"] == torch.where(t == 99, 0, t - 100)).all()
    assert torch.allclose(captured["x_s"], a * x0 + s * eps, atol=1e-6)
    f = captured["f"].detach()
    raw = (f - captured["f_s"]) / ((t - captured["s"]).float() / 1000).view(-1, 1, 1, 1)
    g_hat = raw / (raw.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 0.1)
    abar = method.teacher.scheduler.alphas_cumprod.double()[t]
    w = (abar / (1 - abar)).sqrt().float().view(-1, 1, 1, 1)
    assert torch.allclose(captured["f"].grad, 2 * w * g_hat / 4, atol=1e-6)  # mean over the batch of 4


@pytest.mark.parametrize(
    "method",
    [
        {"name": "boot", "grid_steps": 8},
        {"name": "tbcm", "ddim_steps": 8},
        {"name": "agd", "trajectory_steps": 8},
    ],
)
def test_data_free_methods_never_open_the_data_and_save_a_loadable_generator(
    tmp_path, class_teacher, monkeypatch, method
):
    def refuse(*args, **kwargs):
        raise AssertionError("a data-free method opened the image data")

    monkeypatch.setattr(diffusion_data, "load_image_dataset", refuse)
    monkeypatch.setattr(diffusion_data.MnistImages, "__init__", refuse)
    monkeypatch.setattr(diffusion_data.ImageFolder, "__init__", refuse)
    steps = 2 if method["name"] == "agd" else 1
    data = diffusion_recipe(method, class_teacher, {"source": "embedded:mnist"}, {"steps": steps}, steps=3)
    student = Trainer(recipes.validate(data), tmp_path / "run").fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if "loss/student" in r]) == 3
    sampler = json.loads((student / "stillroom.json").read_text())["sampler"]
    g = load_generator(student)
    out = g(torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2]))
    assert out.shape == (3, 1, 8, 8) and torch.isfinite(out).all()
    if method["name"] == "boot":  # one step from noise at t = 0: y_0 = g(eps, 0)
        assert sampler["timesteps"] == [0] and sampler["prediction"] == "sample"
        noise = torch.randn(2, 1, 8, 8)
        with torch.no_grad():
            y0 = g.unet(noise, torch.zeros(2, dtype=torch.long), class_labels=torch.tensor([4, 5])).sample
            assert torch.allclose(g(noise, torch.tensor([4, 5])), y0.clamp(-1, 1), atol=1e-5)


def test_boot_refuses_multi_step_students(class_teacher, tmp_path):
    from stillroom.core.errors import StillroomError

    with pytest.raises(StillroomError, match="one-step"):
        built("boot", class_teacher, tmp_path, steps=2)
