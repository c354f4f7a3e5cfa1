"""The flow-teacher methods' objectives against independent closed-form computations, and their
data-free / teacher contracts."""

from __future__ import annotations

import shutil
import types

import pytest
import torch

from stillroom.core.errors import StillroomError
from stillroom.plugins.diffusion.methods.flow_map import FlowMap, FlowMapParams
from tests.test_diffusion_fixtures import diffusion_recipe
from tests.test_flow_teacher import build_flow_teacher

M = 0.25  # the data distribution of the closed-form teacher: a point mass at x0 = M


@pytest.fixture(scope="module")
def flow_teacher(tmp_path_factory):
    return build_flow_teacher(tmp_path_factory.mktemp("flow_teacher"))


class PointMassVelocity(torch.nn.Module):
    """The exact velocity of rectified flow onto x0 = m: x_r = (1 - r) m + r eps => v = (x - m) / r."""

    def __init__(self, m: float = M) -> None:
        super().__init__()
        self.m = m

    def forward(self, x, t, class_labels=None):
        r = (t.to(x.dtype) / 1000).view(-1, 1, 1, 1)
        return types.SimpleNamespace(sample=(x - self.m) / r)


class QuadraticStudent(torch.nn.Module):
    """u(z, tau) = z - M + c (tau / 1000)^2; c = 0 is the exact flow map from the prior,
    X = r z + (1 - r) M."""

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = torch.nn.Parameter(torch.tensor(c, dtype=torch.float64))

    def forward(self, z, tau, class_labels=None):
        return types.SimpleNamespace(sample=z - M + self.c * (tau.to(z.dtype) / 1000).view(-1, 1, 1, 1) ** 2)


def closed_form_method(c: float, critic: torch.nn.Module | None = None, **params) -> FlowMap:
    m = FlowMap.__new__(FlowMap)
    m.student, m.T, m.critic = QuadraticStudent(c), 1000, critic
    m.teacher = types.SimpleNamespace(unet=PointMassVelocity(), image_size=4, channels=1)
    m.params = FlowMapParams(fd_step=1e-2, **params)
    m.recipe = types.SimpleNamespace(teacher=types.SimpleNamespace(guidance=2.0))
    m.ctx = types.SimpleNamespace(device="cpu")
    return m


def batch(b: int = 6) -> dict:
    labels = torch.arange(b)
    return {
        "x0": None,
        "cond": {"class_labels": labels},
        "uncond": {"class_labels": torch.full_like(labels, 10)},
    }


def hand_predictor_loss(c: float, seed: int, b: int = 6) -> float:
    """The FreeFlow predictor loss written out for the point-mass teacher and the quadratic student:
    u = z - M + c (1 - r)^2, du/dr = -2 c (1 - r), X = z - (1 - r) u, v(X, r) = (X - M) / r,
    L = mean (u - v(X, r) - (1 - r) du/dr)^2 (the same z and r draws as the method)."""
    torch.manual_seed(seed)
    z = torch.randn(b, 1, 4, 4, dtype=torch.float64)
    h = 1e-2
    r = (h + (1 - 2 * h) * torch.rand(b, dtype=torch.float64)).view(-1, 1, 1, 1)
    u = z - M + c * (1 - r) ** 2
    x = z - (1 - r) * u
    target = (x - M) / r + (1 - r) * (-2 * c * (1 - r))
    return float(((u - target) ** 2).mean())


def test_predictor_loss_is_zero_on_the_exact_flow_map_and_matches_the_hand_formula():
    torch.set_default_dtype(torch.float64)
    try:
        exact = closed_form_method(0.0, corrector_weight=0, decay_power=0)
        torch.manual_seed(3)
        assert exact.loss("student", batch(), 0).loss.item() < 1e-20
        off = closed_form_method(0.7, corrector_weight=0, decay_power=0)
        torch.manual_seed(5)
        got = off.loss("student", batch(), 0).loss.item()
    finally:
        torch.set_default_dtype(torch.float32)
    want = hand_predictor_loss(0.7, 5)
    assert want > 1e-3 and abs(got - want) < 1e-6 * want  # the method casts u and its target to float32


def test_flow_map_never_reads_the_data_source(tmp_path, flow_teacher, monkeypatch):
    from stillroom.core import recipe as recipes
    from stillroom.core.trainer import Trainer
    from stillroom.plugins.diffusion import data

    def refuse(*args, **kwargs):
        raise AssertionError("flow_map opened its data source")

    monkeypatch.setattr(data, "load_image_dataset", refuse)
    rec = recipes.validate(
        diffusion_recipe({"name": "flow_map"}, flow_teacher, {"source": str(tmp_path / "no-such-images")})
    )
    student = Trainer(rec, tmp_path / "run").fit()
    assert (student / "unet").is_dir() and not (tmp_path / "no-such-images").exists()


def hand_predictor_rows(c: float, b: int, k: float):
    """The predictor rows of the closed-form case (the same draws as the method): per row (w_G, mean Delta_G
    (1 - r)^2 = the row's d L / d c up to 2 / B, ||Delta_G||), Delta_G = u - v(X, r) - (1 - r) du/dr."""
    z = torch.randn(b, 1, 4, 4, dtype=torch.float64)
    r = (1e-2 + (1 - 2e-2) * torch.rand(b, dtype=torch.float64)).view(-1, 1, 1, 1)
    u = z - M + c * (1 - r) ** 2
    delta = u - ((z - (1 - r) * u - M) / r - 2 * c * (1 - r) ** 2)
    w = 1 / ((delta**2).mean(dim=(1, 2, 3)) + 1e-3) ** k
    return w, (delta * (1 - r) ** 2).mean(dim=(1, 2, 3)), delta.flatten(1).norm(dim=1)


@pytest.mark.parametrize("fake_m", [M + 0.5, M])
def test_corrector_gradient_is_the_weighted_fake_minus_teacher_velocity_on_the_one_step_sample(fake_m):
    """Student rows 0-5 predictor, 6-7 corrector. A fake velocity of the point mass m' (the student's own
    samples, x = z - u(z, 1000) = M - c, are a point mass too): v_N - v_w = (M - m') / r on every pixel,
    so d L / d c = (2 / B) [sum_pred w_G mean(Delta_G (1 - r)^2) + lambda sum_corr (M - m') / r]
    (d u(z, 1000) / d c = 1), lambda = alpha mean||Delta_G|| / mean||v_N - v_w||; zero when m' = M."""
    alpha, c, k = 0.7, 0.3, 1.0
    torch.set_default_dtype(torch.float64)
    try:
        method = closed_form_method(c, PointMassVelocity(fake_m), corrector_weight=alpha, decay_power=k)
        torch.manual_seed(7)
        out = method.loss("student", batch(8), 0)
        (grad,) = torch.autograd.grad(out.loss, method.student.c)
        torch.manual_seed(7)
        w, pred, norms = hand_predictor_rows(c, 6, k)
        torch.randn(2, 1, 4, 4)  # the corrector's z (its sample M - c does not depend on it)
        r = torch.sigmoid(0.8 + torch.randn(2))
    finally:
        torch.set_default_dtype(torch.float32)
    gap = (M - fake_m) / r  # v_N - v_w on every pixel of corrector row i
    lam = alpha * norms.mean() / (4 * gap.abs().mean() + 1e-8)  # ||.|| over 16 pixels = 4 |gap|
    want = 2 / 8 * ((w * pred).sum() + lam * gap.sum())
    assert abs(grad.item() - want.item()) < 1e-6 * abs(want.item())
    assert abs(out.metrics["corrector_gap"] - float(gap.pow(2).mean().sqrt())) < 1e-6  # 0 when m' = M


def test_critic_is_flow_matching_on_the_students_own_samples():
    """L_fake = mean (v_psi(x_r, r) - (n - x))^2 with x = z - u(z, 1000) = M - c, x_r = (1 - r) x + r n,
    r ~ logit-normal(0.8, 1); v_psi = (x - M) / r + a x; and its gradient in a, mean 2 (v_psi - n + x) x_r."""
    a, c = 0.2, 0.3
    torch.set_default_dtype(torch.float64)
    try:
        method = closed_form_method(c, AffineVelocity(a), corrector_weight=1.0)
        torch.manual_seed(11)
        out = method.loss("critic", batch(5), 0)
        (grad,) = torch.autograd.grad(out.loss, method.critic.c)
        torch.manual_seed(11)
        torch.randn(5, 1, 4, 4)
        r = torch.sigmoid(0.8 + torch.randn(5)).view(-1, 1, 1, 1)
        n = torch.randn(5, 1, 4, 4)
    finally:
        torch.set_default_dtype(torch.float32)
    x = M - c
    x_r = (1 - r) * x + r * n
    residual = (x_r - M) / r + a * x_r - (n - x)
    assert abs(out.loss.item() - float((residual**2).mean())) < 1e-6 * float((residual**2).mean())
    assert abs(grad.item() - float((2 * residual * x_r).mean())) < 1e-6 * abs(
        float((2 * residual * x_r).mean())
    )


def test_corrector_trains_without_data_and_resumes_its_critic_bitwise(tmp_path, flow_teacher, monkeypatch):
    """Every step trains the critic, then the student (step 0, the warm-up, by the predictor alone); a run
    resumed from the step-2 checkpoint (critic weights, Adam state) ends bitwise where the whole run did."""
    from safetensors.torch import load_file

    from stillroom.core import recipe as recipes
    from stillroom.core.trainer import Trainer
    from stillroom.plugins.diffusion import data

    def refuse(*args, **kwargs):
        raise AssertionError("flow_map opened its data source")

    monkeypatch.setattr(data, "load_image_dataset", refuse)
    method = {"name": "flow_map", "corrector_weight": 1.0, "corrector_warmup": 1, "decay_power": 1.0}
    d = diffusion_recipe(method, flow_teacher, {"source": "no-such-images"}, steps=3, checkpoint_every=2)
    whole = Trainer(recipes.validate(d), tmp_path / "run").fit()
    ckpt = tmp_path / "run" / "checkpoints" / "step-0000002"
    optim = torch.load(ckpt / "optim.pt", weights_only=True)["optimizers"]
    assert optim["critic"]["state"] and list(ckpt.glob("critic*.safetensors"))
    teacher = load_file(flow_teacher / "unet" / "diffusion_pytorch_model.safetensors")
    critic = load_file(next(ckpt.glob("critic*.safetensors")))
    assert any(not torch.equal(critic[k], teacher[k]) for k in teacher)  # the critic trained
    shutil.copytree(
        tmp_path / "run" / "checkpoints" / "step-0000002", tmp_path / "part" / "checkpoints" / "step-0000002"
    )
    shutil.copy(tmp_path / "run" / "recipe.yaml", tmp_path / "part" / "recipe.yaml")
    resumed = Trainer(recipes.validate(d), tmp_path / "part").fit(resume=True)
    a = load_file(whole / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "teacher,student,match",
    [("ddpm", {"steps": 1}, "flow-matching"), ("flow", {"steps": 2}, "one-step")],
)
def test_flow_map_refuses_what_it_cannot_distil(
    tmp_path, class_teacher, flow_teacher, teacher, student, match
):
    from stillroom.core import recipe as recipes
    from stillroom.core.trainer import Trainer

    path = class_teacher if teacher == "ddpm" else flow_teacher
    rec = recipes.validate(
        diffusion_recipe({"name": "flow_map"}, path, {"source": "embedded:mnist"}, student)
    )
    with pytest.raises(StillroomError, match=match):
        Trainer(rec, tmp_path / "run").fit()


# -- mdt ------------------------------------------------------------------------------------------
class AffineVelocity(torch.nn.Module):
    """v(x, tau) = (x - M) / t + c x, t = tau / 1000; c = 0 is the teacher's exact velocity (transport M)."""

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = torch.nn.Parameter(torch.tensor(c, dtype=torch.float64))

    def forward(self, x, tau, class_labels=None):
        t = (tau.to(x.dtype) / 1000).view(-1, 1, 1, 1)
        return types.SimpleNamespace(sample=(x - M) / t + self.c * x)


def mdt_method(c: float, lambda_vm: float, lambda_vd: float):
    from stillroom.plugins.diffusion.methods.mdt import MDT, MDTParams

    m = MDT.__new__(MDT)
    m.student, m.T = AffineVelocity(c), 1000
    m.teacher = types.SimpleNamespace(unet=PointMassVelocity(), image_size=4, channels=1)
    m.params = MDTParams(lambda_vm=lambda_vm, lambda_vd=lambda_vd)
    m.recipe = types.SimpleNamespace(teacher=types.SimpleNamespace(guidance=2.0))
    m.ctx = types.SimpleNamespace(device="cpu")
    return m


def hand_residual(x_t, t, c):
    """r = v_theta(x_t, t) - (v(x_t, t) - t D / (||D|| + 0.1)) for the affine student and point-mass teacher,
    D = (v_theta(x_t, t) - v_theta(x_t - 0.01 v(x_t, t), t - 0.01)) / 0.01."""
    v_s = (x_t - M) / t + c * x_t
    v_t = (x_t - M) / t
    x_prev = x_t - 0.01 * v_t
    d = (v_s - ((x_prev - M) / (t - 0.01) + c * x_prev)) / 0.01
    d = d / (d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 0.1)
    return v_s - (v_t - t * d)


def draw_t(b):
    return 0.01 + 0.99 * torch.sigmoid(torch.randn(b, dtype=torch.float64) + 1.0)


def test_mdt_velocity_matching_is_zero_on_the_exact_transport_and_matches_the_hand_formula():
    x0 = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    data = {**batch(), "x0": x0}
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(1)
        assert mdt_method(0.0, 1.0, 0.0).loss("student", data, 0).loss.item() < 1e-20
        torch.manual_seed(2)
        got = mdt_method(0.3, 1.0, 0.0).loss("student", data, 0).loss.item()
        torch.manual_seed(2)
        t = draw_t(6).view(-1, 1, 1, 1)
        x_t = (1 - t) * x0 + t * torch.randn(6, 1, 4, 4)
    finally:
        torch.set_default_dtype(torch.float32)
    want = float((hand_residual(x_t, t, 0.3) ** 2).mean())
    assert want > 1e-3 and abs(got - want) < 1e-6 * want


def test_mdt_velocity_distillation_gradient_is_the_residual_through_the_one_step_sample():
    torch.set_default_dtype(torch.float64)
    try:
        method = mdt_method(0.3, 0.0, 1.0)
        torch.manual_seed(4)
        out = method.loss("student", {**batch(), "x0": None}, 0)
        (grad,) = torch.autograd.grad(out.loss, method.student.c)
        torch.manual_seed(4)
        z = torch.randn(6, 1, 4, 4)
        t = draw_t(6).view(-1, 1, 1, 1)
        x_hat = z - ((z - M) + 0.3 * z)  # one step from t = 1: x_hat = z - v_theta(z, 1)
        x_t = (1 - t) * x_hat + t * torch.randn(6, 1, 4, 4)
    finally:
        torch.set_default_dtype(torch.float32)
    r = hand_residual(x_t, t, 0.3)
    # d v_theta(z, 1) / dc = z, so dL/dc = mean(2 r z); the loss value is mean(r^2)
    assert abs(out.loss.item() - float((r**2).mean())) < 1e-6 * float((r**2).mean())
    assert abs(grad.item() - float((2 * r * z).mean())) < 1e-6 * abs(float((2 * r * z).mean()))


def test_mdt_trains_a_loadable_two_step_flow_student_and_refuses_a_ddpm_teacher(
    tmp_path, class_teacher, flow_teacher, label_folder
):
    from stillroom.core import recipe as recipes
    from stillroom.core.trainer import Trainer
    from stillroom.plugins.diffusion.sampler import load_generator

    data = {"source": str(label_folder)}
    rec = recipes.validate(diffusion_recipe({"name": "mdt"}, flow_teacher, data, {"steps": 2}))
    student = Trainer(rec, tmp_path / "run").fit()
    g = load_generator(student)
    assert g.sampler["prediction"] == "flow" and g.sampler["timesteps"] == [1000, 500]
    out = g(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]))
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
    rec = recipes.validate(diffusion_recipe({"name": "mdt"}, class_teacher, data))
    with pytest.raises(StillroomError, match="flow-matching"):
        Trainer(rec, tmp_path / "ddpm").fit()
