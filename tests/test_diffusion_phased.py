"""Phased DMD (Fan et al. 2025): the subinterval objectives against closed-form Gaussian answers, the
mixture of timestep experts, and a tiny run whose one exported graph switches expert per step."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from stillroom.core import onnx_export, ort_session
from stillroom.core import recipe as recipes
from stillroom.core.errors import StillroomError
from stillroom.core.host import get_host
from stillroom.core.method import Context
from stillroom.core.trainer import Trainer
from stillroom.plugins.diffusion import models as dm
from stillroom.plugins.diffusion import sampler as gen
from stillroom.plugins.diffusion.experts import PhasedExperts
from stillroom.plugins.diffusion.export import SamplerGraph
from stillroom.plugins.diffusion.methods.phased_dmd import (
    noise_ratio,
    subinterval_denoise,
    subinterval_score_loss,
    transition,
)
from tests.test_diffusion_fixtures import diffusion_recipe
from tests.test_flow_teacher import build_flow_teacher

# abar at s < t (VP); s is noisy enough that treating x_s as clean is visibly biased
ABAR_S, ABAR_T = 0.3, 0.2


def _coef(abar):
    return torch.tensor(abar, dtype=torch.float64).sqrt(), torch.tensor(1 - abar, dtype=torch.float64).sqrt()


def test_transition_composes_the_two_forward_processes():
    a_t, s_t = _coef(ABAR_T)
    a_s, s_s = _coef(ABAR_S)
    a_ts, s_ts = transition(a_t, s_t, a_s, s_s)
    # x_t = a_ts (a_s x0 + s_s e1) + s_ts e2 must have x0-coefficient a_t and noise variance s_t^2
    assert torch.allclose(a_ts * a_s, a_t) and torch.allclose(a_ts**2 * s_s**2 + s_ts**2, s_t**2)
    a_clean, s_clean = transition(a_t, s_t, torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0))
    assert torch.allclose(a_clean, a_t) and torch.allclose(s_clean, s_t)


def test_subinterval_target_is_unbiased_and_the_naive_one_is_not():
    """x0 ~ N(0, c^2): E[eps | x_t] = s_t x_t / (a_t^2 c^2 + s_t^2). A critic that only sees x_s and
    regresses (s_t / s_ts) eps_ts recovers it; regressing eps_ts (x_s treated as clean) does not."""
    g = torch.Generator().manual_seed(0)
    c, n = 0.7, 400_000
    a_t, s_t = _coef(ABAR_T)
    a_s, s_s = _coef(ABAR_S)
    a_ts, s_ts = transition(a_t, s_t, a_s, s_s)
    x0 = c * torch.randn(n, generator=g, dtype=torch.float64)
    x_s = a_s * x0 + s_s * torch.randn(n, generator=g, dtype=torch.float64)
    eps_ts = torch.randn(n, generator=g, dtype=torch.float64)
    x_t = a_ts * x_s + s_ts * eps_ts
    true_slope = float(s_t / (a_t**2 * c**2 + s_t**2))

    def fitted_slope(target):  # least squares of target on x_t: the minimiser of E||k x_t - target||^2
        return float((x_t * target).sum() / (x_t * x_t).sum())

    assert fitted_slope((s_t / s_ts) * eps_ts) == pytest.approx(true_slope, rel=0.01)
    assert abs(fitted_slope(eps_ts) - true_slope) > 0.2 * true_slope
    # the weighted loss has the same minimiser: its gradient vanishes at the true slope
    k = torch.tensor(true_slope, dtype=torch.float64, requires_grad=True)
    subinterval_score_loss(k * x_t, eps_ts, s_ts, s_t).backward()
    assert abs(float(k.grad)) < 0.01


def test_subinterval_denoiser_is_the_gaussian_posterior_mean():
    c = 0.7
    a_t, s_t = _coef(ABAR_T)
    a_s, s_s = _coef(ABAR_S)
    a_ts, s_ts = transition(a_t, s_t, a_s, s_s)
    x_t = torch.linspace(-3, 3, 13, dtype=torch.float64)
    eps_exact = s_t * x_t / (a_t**2 * c**2 + s_t**2)
    var_s = a_s**2 * c**2 + s_s**2  # x_s ~ N(0, var_s); x_t | x_s ~ N(a_ts x_s, s_ts^2)
    posterior = a_ts * var_s * x_t / (a_ts**2 * var_s + s_ts**2)
    assert torch.allclose(subinterval_denoise(x_t, eps_exact, a_ts, s_ts, s_t), posterior)
    # at the clean end (s = -1: a_s = 1, s_s = 0) it is the x0 denoiser DMD2 uses
    a_0, s_0 = transition(a_t, s_t, torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0))
    x0_hat = (x_t - s_t * eps_exact) / a_t
    assert torch.allclose(subinterval_denoise(x_t, eps_exact, a_0, s_0, s_t), x0_hat)


def test_subinterval_loss_at_the_clean_end_is_dmd2s_critic_loss():
    eps_phi, eps = torch.randn(4, 1, 3, 3), torch.randn(4, 1, 3, 3)
    s_t = torch.rand(4, 1, 1, 1) + 0.1
    assert torch.allclose(subinterval_score_loss(eps_phi, eps, s_t, s_t), F.mse_loss(eps_phi, eps))


def test_noise_ratio_is_its_limit_at_the_flow_clean_end():
    s_t = torch.tensor([0.0, 1e-3, 0.5, 1.0], dtype=torch.float64)
    assert torch.equal(noise_ratio(s_t, s_t), torch.ones(4, dtype=torch.float64))  # s = -1: s_ts = s_t
    s_ts = torch.tensor([0.0, 5e-4, 0.3, 0.8], dtype=torch.float64)
    assert torch.allclose(noise_ratio(s_ts[1:], s_t[1:]), s_ts[1:] / s_t[1:])
    x_t, eps = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2)
    one, zero = torch.ones(4, 1, 1, 1), torch.zeros(4, 1, 1, 1)
    assert torch.equal(subinterval_denoise(x_t, eps, one, zero, zero), x_t)  # noiseless: E[x0 | x0] = x0


@pytest.fixture(scope="module")
def flow_phased(tmp_path_factory, label_folder):
    """phased_dmd (4 steps, 2 phases) on the tiny flow teacher, with the widest generator range t_min=0,
    t_max=1, built but not trained; and a batch."""
    tmp = tmp_path_factory.mktemp("flow_phased")
    params = {"name": "phased_dmd", "phases": 2, "critic_updates": 1, "t_min": 0.0, "t_max": 1.0}
    data = diffusion_recipe(params, build_flow_teacher(tmp / "teacher"), {"source": str(label_folder)},
                            {"steps": 4})  # fmt: skip
    method = get_host().method("phased_dmd")(
        recipes.validate(data), Context(torch.device("cpu"), torch.float32, tmp)
    )
    method.roles = method.build()
    ds = method.dataset()
    return method, method.collate([ds[i] for i in range(4)])


def _range(draw):
    torch.manual_seed(0)
    t = draw(20_000, "cpu")  # P(an end of a 1001-wide range is never drawn) < 1e-8
    return int(t.min()), int(t.max())


@pytest.mark.parametrize("phase", [0, 1])
def test_every_timestep_a_flow_phase_can_draw_gives_finite_coefficients_and_losses(flow_phased, phase):
    """Issue 18: on a flow teacher the last phase (s = -1) draws t = 0, where sigma_t = 0, and its
    critic's (sigma_{t|s} / sigma_t) was 0 / 0: NaN loss a few dozen steps into the phase."""
    method, batch = flow_phased
    method.phase = phase
    s = method.end()
    critic, generator = _range(method.critic_t), _range(method.random_t)
    assert critic == (s + 1, method.top) and generator == (s + 1, method.T - 1)
    for (lo, hi), used in ((critic, "critic"), (generator, "generator")):
        t = torch.arange(lo, hi + 1)
        _, _, a_ts, s_ts, s_t = method.diffuse(torch.zeros(len(t), 1, 1, 1), t)
        coef = noise_ratio(s_ts, s_t)
        if used == "generator":  # the critic's loss never divides by alpha_{t|s} (0 at t = T)
            coef = subinterval_denoise(torch.ones_like(a_ts), torch.ones_like(a_ts), a_ts, s_ts, s_t)
        assert torch.isfinite(coef).all(), (used, t[~torch.isfinite(coef.flatten())].tolist())
    draws = {"critic_t": critic, "random_t": generator}
    for pick in (0, 1):  # the losses at each end of both ranges
        for name, ends in draws.items():
            setattr(method, name, lambda b, dev, t=ends[pick]: torch.full((b,), t, device=dev))
        for loss in (method.critic_loss(batch).loss, method.generator_loss(batch).loss):
            assert torch.isfinite(loss), (phase, pick)
    for name in draws:
        delattr(method, name)


def test_flow_critic_loss_at_the_clean_end_is_the_velocity_regression(flow_phased):
    """t = 0, s = -1: x_t = x_0, the loss must be ||eps_phi - eps||^2 with eps_phi = x_0 + v_phi(x_0, 0)."""
    method, batch = flow_phased
    method.phase = 1
    method.critic_t = lambda b, dev: torch.zeros(b, dtype=torch.long, device=dev)
    try:
        torch.manual_seed(11)
        got = method.critic_loss(batch).loss
        torch.manual_seed(11)
        with torch.no_grad():
            x0, _ = method.phase_sample(batch)
            eps = torch.randn_like(x0)
            t = torch.zeros(len(x0), dtype=torch.long)
            v = method.critic(x0, t, class_labels=batch["cond"]["class_labels"]).sample
    finally:
        del method.critic_t
    assert torch.isfinite(got) and torch.allclose(got, F.mse_loss(x0 + v, eps), rtol=1e-5)


def _experts(class_teacher, n=2):
    base = dm.load_unet(class_teacher / "unet")
    experts = [base] + [copy.deepcopy(base) for _ in range(n - 1)]
    with torch.no_grad():
        for i, e in enumerate(experts[1:], 1):
            for p in e.parameters():
                p.add_(0.05 * i * torch.randn_like(p))
    return experts


def test_experts_answer_by_timestep_per_sample(class_teacher):
    experts = _experts(class_teacher, 3)
    moe = PhasedExperts(experts, [700, 300]).eval()
    x, labels = torch.randn(4, 1, 8, 8), torch.tensor([1, 2, 3, 4])
    t = torch.tensor([999, 700, 301, 0])  # experts 0, 1, 1, 2 (t <= b_i counts the boundaries passed)
    with torch.no_grad():
        out = moe(x, t, class_labels=labels).sample
        for row, e in enumerate([0, 1, 1, 2]):
            want = experts[e](x[row : row + 1], t[row : row + 1], class_labels=labels[row : row + 1]).sample
            assert torch.allclose(out[row : row + 1], want, atol=1e-5), (row, e)
    with pytest.raises(ValueError, match="decreasing"):
        PhasedExperts(experts, [300, 700])


def test_phases_must_divide_the_steps(tmp_path, class_teacher):
    data = diffusion_recipe({"name": "phased_dmd", "phases": 2}, class_teacher, {"source": "embedded:mnist"})
    data["student"] = {"steps": 3}
    with pytest.raises(StillroomError, match="multiple of method.phases"):
        Trainer(recipes.validate(data), tmp_path / "run").fit()


def _short_run(tmp_path, class_teacher, label_folder):
    data = diffusion_recipe(
        {"name": "phased_dmd", "phases": 2, "critic_updates": 1, "critic_lr": 1e-3},
        class_teacher,
        {"source": str(label_folder)},
        {"steps": 2},
        steps=4,
        lr=1e-3,
        checkpoint_every=2,
    )
    return Trainer(recipes.validate(data), tmp_path / "run").fit()


def test_short_run_trains_one_expert_per_phase(tmp_path, class_teacher, label_folder):
    student = _short_run(tmp_path, class_teacher, label_folder)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == [0, 0, 1, 1] and all(np.isfinite(r["dm"]) for r in rows)
    assert all(r["sim_step"] == r["phase"] for r in rows)  # one step per phase: step j = phase
    g = gen.load_generator(student)
    moe = g.unet
    assert isinstance(moe, PhasedExperts) and moe.boundaries == [g.sampler["timesteps"][1]]
    teacher = dm.load_unet(class_teacher / "unet").conv_in.weight
    first, second = (e.conv_in.weight for e in moe.experts)
    assert not torch.equal(first, second) and not torch.equal(second, teacher)
    out = g(torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2]))
    assert out.shape == (3, 1, 8, 8) and torch.isfinite(out).all()
    # phase 1 (steps 3-4) leaves expert 0, trained in phase 0, exactly as it was after step 2,
    from safetensors.torch import load_file

    ckpt = [
        load_file(tmp_path / "run" / "checkpoints" / f"step-{n:07d}" / "student.safetensors") for n in (2, 4)
    ]
    for prefix, same in (("experts.0.", True), ("experts.1.", False)):
        keys = [k for k in ckpt[0] if k.startswith(prefix)]
        assert keys and all(torch.equal(ckpt[0][k], ckpt[1][k]) for k in keys) == same, prefix
    # and phase 0 left expert 1 at its initial (teacher) weights
    initial = dm.load_unet(class_teacher / "unet").state_dict()
    assert all(torch.equal(ckpt[0][f"experts.1.{k}"], v) for k, v in initial.items())


class ToyExpert(nn.Module):
    """A UNet-shaped stand-in (same call and ``.sample``) small enough to export in seconds."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.emb = nn.Embedding(11, 1)
        self.config = SimpleNamespace(sample_size=8, in_channels=1, num_class_embeds=11)

    def forward(self, x, t, class_labels=None):
        scale = 1 + t.float().view(-1, 1, 1, 1) / 1000
        return SimpleNamespace(sample=self.conv(x) * scale + self.emb(class_labels).view(-1, 1, 1, 1))


def _sampler(timesteps):
    return {"steps": len(timesteps), "timesteps": timesteps, "prediction": "epsilon", "conditioning": "class",
            "null_class": 10, "num_classes": 10}  # fmt: skip


def test_one_exported_graph_switches_expert_per_step_and_matches_torch(tmp_path):
    abar = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)
    timesteps = [999, 666, 333]
    experts = [ToyExpert(seed) for seed in range(3)]
    moe = PhasedExperts(experts, timesteps[1:])
    g = gen.FewStepGenerator(moe, _sampler(timesteps), abar).eval()
    path = tmp_path / "moe.onnx"
    names = ["noise", "class_labels"]
    x, c = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    dynamic = {n: {0: "batch_size"} for n in names}
    onnx_export.export_module(SamplerGraph(g, "class", False), (x, c), path, names, ["image"], dynamic,
                              optimize=False, allow_torchscript=False)  # fmt: skip
    session = ort_session.open_session(path, ort_session.SessionOptions.checks())[0]
    noise, labels = torch.randn(5, 1, 8, 8), torch.tensor([0, 3, 5, 7, 9])
    onnx_out = session.run(None, {"noise": noise.numpy(), "class_labels": labels.numpy()})[0]

    def sample(step_experts):  # step k made by expert step_experts[k]: the reference the graph must match
        x = noise
        for k, e in enumerate(step_experts):
            one = gen.FewStepGenerator(experts[e], _sampler(timesteps), abar)
            x0, eps = one.denoise(k, x, labels)
            x = gen.ddim_step(x0, eps, one.s_a_next[k], one.s_s_next[k])
        return x.clamp(-1, 1).numpy()

    with torch.no_grad():
        right, torch_moe = sample([0, 1, 2]), g(noise, labels).numpy()
        wrong = [sample(order) for order in ([0, 0, 0], [0, 1, 1], [1, 1, 2])]
    assert np.abs(torch_moe - right).max() < 1e-6
    assert np.abs(onnx_out - right).max() < 1e-4
    assert all(np.abs(onnx_out - w).max() > 1e-3 for w in wrong)
    # one graph: every step's weights come from one Gather over the experts' stacked weights
    import onnx

    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "If" not in ops and ops.count("Conv") == len(timesteps)


@pytest.mark.slow
def test_trained_student_exports_and_validates(tmp_path, class_teacher, label_folder):
    """The family's exporter on a trained mixture (minutes on a loaded 2-core machine: dynamo)."""
    from stillroom.plugins.diffusion.export import export_generator

    art = export_generator(_short_run(tmp_path, class_teacher, label_folder), tmp_path / "artifact")
    assert art.manifest.validation["passed"] and art.manifest.exporter == "dynamo"
