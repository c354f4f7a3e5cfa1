"""Every diffusion method on a flow-matching (velocity) teacher: the base's coefficients are the rectified
flow's (a_t = 1 - t/1000, s_t = t/1000), progressive's and DMD2's losses match hand computations with
those formulas, and each registered method trains on a tiny flow teacher to a finite, loadable student."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from stillroom.core import recipe as recipes
from stillroom.core.errors import StillroomError
from stillroom.core.host import get_host
from stillroom.core.method import Context
from stillroom.core.trainer import Trainer
from stillroom.plugins.diffusion.sampler import load_generator
from tests.test_diffusion_fixtures import diffusion_recipe
from tests.test_flow_teacher import build_flow_teacher

# the tiny settings each method trains with (every registered diffusion method must be listed)
RUNS = {
    "progressive": {"start_steps": 2},
    "consistency": {"ddim_steps": 10},
    "dmd2": {"critic_updates": 1},
    "vsd": {},
    "agd": {"trajectory_steps": 4},
    "phased_dmd": {"critic_updates": 1},
    "flow_map": {},
    "mdt": {},
    "boot": {"grid_steps": 4},
    "tbcm": {"ddim_steps": 10},
    "distill_dpo": {"preference": "brightness", "distill_teacher_steps": 2},
}


@pytest.fixture(scope="module")
def flow_teacher(tmp_path_factory):
    return build_flow_teacher(tmp_path_factory.mktemp("flow_teacher"))


@pytest.fixture(scope="module")
def brightness():
    """A ranking metric for the 8x8 tiny teacher (the embedded classifier reads 28x28 digits)."""
    from stillroom.plugins.diffusion.methods.distill_dpo import PREFERENCES, register_preference

    register_preference("brightness", lambda x, c: x.float().mean(dim=(1, 2, 3)).cpu())
    yield "brightness"
    PREFERENCES.pop("brightness")


def hand(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rectified flow by hand: a_t = 1 - t / 1000, s_t = t / 1000 ([B, 1, 1, 1]); t = -1 is the clean end."""
    sigma = torch.where(t < 0, torch.zeros_like(t, dtype=torch.float32), t.float() / 1000)
    return (1 - sigma).view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)


def built(name, teacher, folder, tmp_path, params=None):
    data = diffusion_recipe({"name": name, **(params or {})}, teacher, {"source": str(folder)})
    method = get_host().method(name)(
        recipes.validate(data), Context(torch.device("cpu"), torch.float32, tmp_path)
    )
    method.roles = method.build()
    ds = method.dataset()
    return method, method.collate([ds[i] for i in range(4)])


def v_cfg(unet, x, t, labels, w=None):
    """A velocity network's output at integer timesteps t, with CFG u + w (c - u) (null class 10)."""
    c = unet(x, t, class_labels=labels).sample
    if w is None:
        return c
    u = unet(x, t, class_labels=torch.full_like(labels, 10)).sample
    return u + w * (c - u)


def test_coefficients_and_sampler_are_the_rectified_flows(flow_teacher, label_folder, tmp_path):
    method, _ = built("progressive", flow_teacher, label_folder, tmp_path, {"start_steps": 4})
    assert method.teacher.prediction == "flow" and method.student_prediction == "flow"
    assert (method.T, method.top) == (1000, 1000)
    t = torch.tensor([-1, 0, 1, 250, 500, 999, 1000])
    a, s = method.coeffs(t)
    want_a, want_s = hand(t)
    assert torch.allclose(a, want_a, atol=1e-7) and torch.allclose(s, want_s, atol=1e-7)
    assert method.lcm_grid(4) == [250, 500, 750, 1000]  # ends at pure noise, like the student's grid
    g = method.generator()
    assert g.timesteps.tolist() == [1000, 500]  # round 0 of start_steps 4: the 2-step student grid
    assert torch.allclose(g.s_a, torch.tensor([0.0, 0.5])) and torch.allclose(
        g.s_s_next, torch.tensor([0.5, 0.0])
    )


def test_progressive_loss_on_a_flow_teacher_matches_the_hand_formula(flow_teacher, label_folder, tmp_path):
    method, batch = built("progressive", flow_teacher, label_folder, tmp_path, {"start_steps": 4})
    torch.manual_seed(7)
    got = method.loss("student", batch, 0).loss
    torch.manual_seed(7)
    x0, labels = batch["x0"], batch["cond"]["class_labels"]
    grid = torch.tensor([1000, 750, 500, 250, -1])  # the teacher's 4-step flow grid, then the clean end
    i = torch.randint(0, 2, (4,)) * 2
    t, tp, tpp = grid[i], grid[i + 1], grid[i + 2]
    eps = torch.randn_like(x0)
    (a_t, s_t), (a_tpp, s_tpp) = hand(t), hand(tpp)
    z_t = a_t * x0 + s_t * eps
    with torch.no_grad():
        z = z_t
        for now, nxt in ((t, tp), (tp, tpp)):  # Euler steps of the CFG velocity = DDIM steps of (x0, eps)
            z = z + (hand(nxt)[1] - hand(now)[1]) * v_cfg(method.teacher.unet, z, now, labels, 2.0)
        target = (z - (s_tpp / s_t) * z_t) / (a_tpp - (s_tpp / s_t) * a_t)
        x_hat = z_t - s_t * method.student(z_t, t, class_labels=labels).sample
        want = ((a_t**2 / s_t**2).clamp(min=1) * (x_hat - target) ** 2).mean()
    assert want > 0 and torch.allclose(got, want, rtol=1e-4, atol=1e-6)


def test_dmd2_losses_on_a_flow_teacher_match_the_hand_formulas(flow_teacher, label_folder, tmp_path):
    method, batch = built("dmd2", flow_teacher, label_folder, tmp_path, {"critic_updates": 1})
    labels = batch["cond"]["class_labels"]
    torch.manual_seed(3)
    got_gen = method.generator_loss(batch).loss
    torch.manual_seed(3)
    z = torch.randn(4, 1, 8, 8)
    torch.randint(0, 1, ())  # the back-simulation step k of a one-step student
    with torch.no_grad():
        x = z - method.student(z, torch.full((4,), 1000), class_labels=labels).sample  # x0 = x_T - 1 * v
        t = torch.randint(20, 980, (4,))
        a, s = hand(t)
        x_t = a * x + s * torch.randn_like(x)
        x_real = x_t - s * v_cfg(method.teacher.unet, x_t, t, labels, 2.0)
        x_fake = x_t - s * v_cfg(method.critic, x_t, t, labels)
        grad = (x_fake - x_real) / (x - x_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(got_gen, 0.5 * (grad**2).mean(), rtol=1e-4, atol=1e-9)

    torch.manual_seed(5)
    got_critic = method.critic_loss(batch).loss
    torch.manual_seed(5)
    z = torch.randn(4, 1, 8, 8)
    torch.randint(0, 1, ())
    with torch.no_grad():
        x = z - method.student(z, torch.full((4,), 1000), class_labels=labels).sample
    t = torch.randint(0, 1001, (4,))  # the critic's full range, pure noise (t = 1000) included
    eps = torch.randn_like(x)
    a, s = hand(t)
    x_t = a * x + s * eps
    eps_fake = x_t + a * method.critic(x_t, t, class_labels=labels).sample  # eps = x + a v
    assert torch.allclose(got_critic, F.mse_loss(eps_fake, eps), rtol=1e-4)


def test_every_registered_diffusion_method_is_covered():
    diffusion = {m for info in get_host().infos() if info.name == "diffusion" for m in info.methods}
    assert diffusion == set(RUNS)


@pytest.fixture(scope="module")
def flow_student(tmp_path_factory, flow_teacher, label_folder):
    """A one-step velocity student of the flow teacher (distill_dpo tunes a distilled student)."""
    data = diffusion_recipe(
        {"name": "progressive", "start_steps": 2}, flow_teacher, {"source": str(label_folder)}
    )
    return Trainer(recipes.validate(data), tmp_path_factory.mktemp("flow_student")).fit()


@pytest.mark.parametrize("name", sorted(RUNS))
def test_each_method_trains_a_finite_loadable_student_on_a_flow_teacher(
    name, tmp_path, flow_teacher, label_folder, brightness, request
):
    student = {"steps": 1}
    if name == "distill_dpo":
        student["init"] = str(request.getfixturevalue("flow_student"))
    data = diffusion_recipe(
        {"name": name, **RUNS[name]}, flow_teacher, {"source": str(label_folder)}, student
    )
    out = Trainer(recipes.validate(data), tmp_path / "run").fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [v for r in rows for k, v in r.items() if k.startswith("loss/")]
    assert losses and all(math.isfinite(v) for v in losses)
    g = load_generator(out)
    # the one-step student starts from pure noise (t = T); BOOT's signal generator reads its noise at t = 0
    assert g.timesteps.tolist() == ([0] if name == "boot" else [1000])
    assert g.prediction == ("sample" if name == "boot" else "flow")
    images = g(torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2]))
    assert images.shape == (3, 1, 8, 8) and torch.isfinite(images).all()


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_a_student_parametrisation_a_flow_schedule_cannot_invert_is_refused(
    prediction, tmp_path, flow_teacher, label_folder
):
    data = diffusion_recipe(
        {"name": "dmd2"}, flow_teacher, {"source": str(label_folder)}, {"steps": 1, "prediction": prediction}
    )
    with pytest.raises(StillroomError) as err:
        Trainer(recipes.validate(data), tmp_path / "run").fit()
    assert "\n" not in str(err.value) and "flow-matching teacher" in str(err.value)


def test_gpu_check_gives_flow_only_methods_the_tiny_flow_teacher(tmp_path):
    import importlib.util
    import sys

    from tests.conftest import REPO

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_check", gpu_check)  # dataclasses look their module up
    spec.loader.exec_module(gpu_check)
    assets = {"diffusion_teacher": tmp_path / "ddpm", "flow_teacher": tmp_path / "flow", "images": tmp_path}
    teachers = {m: gpu_check.tiny_recipe(m, "diffusion", assets, tmp_path)["teacher"]["path"] for m in RUNS}
    assert {m for m, path in teachers.items() if path == str(tmp_path / "flow")} == {"flow_map", "mdt"}
    assert {teachers[m] for m in RUNS if m not in ("flow_map", "mdt")} == {str(tmp_path / "ddpm")}
