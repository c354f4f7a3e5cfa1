"""The methods' equations against independent float64 references written from the papers."""

from __future__ import annotations

import math

import torch
from torch import nn

from stillroom.plugins.diffusion import sampler as gen
from stillroom.plugins.diffusion.base import score_distillation_loss
from stillroom.plugins.diffusion.methods.dmd2 import dmd_gradient
from stillroom.plugins.diffusion.methods.progressive import progressive_target
from tests.test_diffusion_fixtures import diffusion_recipe

SCHED = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}


def abar64():
    betas = torch.linspace(0.0001, 0.02, 1000, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


class Recorder(nn.Module):
    """A deterministic 'UNet' (eps = tanh(x) + t/1000 + label/10) that records (t, x) of every call."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.config = type("C", (), {"time_cond_proj_dim": None})()

    def forward(self, x, t, class_labels=None, **_):
        self.calls.append((t.clone(), x.clone()))
        out = (
            torch.tanh(x)
            + t.view(-1, 1, 1, 1).to(x.dtype) / 1000
            + class_labels.view(-1, 1, 1, 1).to(x.dtype) / 10
        )
        return type("O", (), {"sample": out})()


def ref_eps(x, t, label):
    return torch.tanh(x) + t / 1000 + label / 10


def test_consistency_parametrisation_is_identity_at_the_boundary():
    c_skip, c_out = gen.consistency_scalings(torch.tensor([0.0, 3.0, 500.0]), 0.5, 10.0)
    assert c_skip[0] == 1 and c_out[0] == 0
    s = torch.tensor([30.0, 5000.0], dtype=torch.float64)
    assert torch.allclose(c_skip[1:], 0.25 / (s**2 + 0.25)) and torch.allclose(
        c_out[1:], s / torch.sqrt(s**2 + 0.25)
    )
    from stillroom.plugins.diffusion.methods.consistency import Consistency

    method = Consistency.__new__(Consistency)
    method.abar = abar64().float()
    method.params = type("P", (), {"sigma_data": 0.5, "timestep_scaling": 10.0})()
    method.teacher = type("T", (), {"prediction": "epsilon"})()
    method.student_prediction = "epsilon"
    x = torch.randn(2, 1, 4, 4)
    t = torch.tensor([0, 400])
    f = method.consistency_fn(Recorder(), x, t, t.clone(), {"class_labels": torch.tensor([1, 2])}, None)
    assert torch.equal(f, x)  # f(x, e) = x exactly
    f2 = method.consistency_fn(
        Recorder(),
        x,
        torch.tensor([0, 401]),
        torch.tensor([0, 0]),
        {"class_labels": torch.tensor([1, 2])},
        None,
    )
    assert not torch.allclose(f2[1], x[1])


def test_progressive_target_reproduces_two_teacher_ddim_steps_in_one():
    from diffusers import DDIMScheduler

    ab = abar64()
    sched = DDIMScheduler.from_config(
        SCHED, timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True
    )
    sched.set_timesteps(8)
    t, tp, tpp = (int(v) for v in sched.timesteps[2:5])
    z_t = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2], dtype=torch.float64).view(-1, 1, 1, 1)
    z = z_t.clone()
    for tt in (t, tp):  # two teacher DDIM steps by diffusers
        z = sched.step(ref_eps(z, tt, labels), tt, z, eta=0.0).prev_sample
    a = lambda v: ab[v].sqrt()  # noqa: E731
    s = lambda v: (1 - ab[v]).sqrt()  # noqa: E731
    x_tilde = progressive_target(z_t, z, a(t), s(t), a(tpp), s(tpp))
    eps_implied = (z_t - a(t) * x_tilde) / s(t)
    one_step = a(tpp) * x_tilde + s(tpp) * eps_implied  # a single DDIM step t -> t''
    assert torch.allclose(one_step, z, atol=1e-10)


def test_dmd_gradient_is_the_normalised_score_difference_and_moves_toward_the_teacher():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    real, fake = torch.randn(4, 1, 6, 6, dtype=torch.float64), torch.randn(4, 1, 6, 6, dtype=torch.float64)
    grad = dmd_gradient(x.detach(), real, fake)
    for i in range(4):
        norm = sum(abs(float(x.detach()[i].flatten()[j] - real[i].flatten()[j])) for j in range(36)) / 36
        assert torch.allclose(grad[i], (fake[i] - real[i]) / norm)
    loss = score_distillation_loss(x, grad)
    loss.backward()
    assert torch.allclose(x.grad.double(), grad / x.numel(), atol=1e-7)
    # one descent step reduces the distance to the real (teacher) prediction, increases it to the fake
    step = x.detach() - 0.05 * x.numel() * x.grad.double()
    assert (step - real).norm() < (x.detach() - real).norm()
    assert (step - fake).norm() > (x.detach() - fake).norm()


def ddim_ref(x, ts, labels, ab):
    """Float64 DDIM (eta 0) with the Recorder's eps, ending at abar = 1."""
    for i, t in enumerate(ts):
        nxt = ab[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
        eps = ref_eps(x, t, labels)
        x0 = (x - (1 - ab[t]).sqrt() * eps) / ab[t].sqrt()
        x = nxt.sqrt() * x0 + (1 - nxt).sqrt() * eps
    return x


def sampler(ts, **kw):
    out = {
        "steps": len(ts),
        "timesteps": ts,
        "guidance": None,
        "prediction": "epsilon",
        "conditioning": "class",
        "null_class": 10,
        "boundary": None,
        "hybrid": None,
    }
    out.update(kw)
    return out


def test_generator_matches_a_float64_ddim_reference():
    ab = abar64()
    ts = gen.ddim_timesteps(SCHED, 4)
    assert ts == [999, 749, 499, 249]
    g = gen.FewStepGenerator(Recorder(), sampler(ts), ab)
    noise, labels = torch.randn(2, 1, 4, 4), torch.tensor([3, 7])
    ref = ddim_ref(noise.double(), ts, labels.double().view(-1, 1, 1, 1), ab).clamp(-1, 1)
    assert torch.allclose(g(noise, labels).double(), ref, atol=1e-4)


def test_hybrid_sampler_hands_over_at_the_right_noise_level():
    ab = abar64()
    teacher, student = Recorder(), Recorder()
    s = gen.with_hybrid(sampler([999, 749, 499, 249]), "unused", 1000, 2, 749, None, "epsilon")
    assert s["timesteps"] == [749, 499, 249] and s["hybrid"]["timesteps"] == [999, 874]
    g = gen.FewStepGenerator(student, s, ab, teacher_unet=teacher)
    noise, labels = torch.randn(2, 1, 4, 4), torch.tensor([1, 5])
    g(noise, labels)
    assert [int(c[0][0]) for c in teacher.calls] == [999, 874]
    assert [int(c[0][0]) for c in student.calls] == [749, 499, 249]
    # the student's first input is the teacher's DDIM state at the handover timestep 749
    lab = labels.double().view(-1, 1, 1, 1)
    x = noise.double()
    for t, nxt in ((999, 874), (874, 749)):
        eps = ref_eps(x, t, lab)
        x0 = (x - (1 - ab[t]).sqrt() * eps) / ab[t].sqrt()
        x = ab[nxt].sqrt() * x0 + (1 - ab[nxt]).sqrt() * eps
    assert torch.allclose(student.calls[0][1].double(), x, atol=1e-4)
    assert not torch.allclose(student.calls[0][1], noise)


def test_snoopi_scale_is_drawn_per_step_within_range(tmp_path, class_teacher, label_folder):
    from stillroom.core import recipe as recipes
    from stillroom.core.trainer import Trainer

    data = diffusion_recipe(
        {"name": "vsd", "critic": "lora", "lora_rank": 2, "guidance_min": 1.5, "guidance_max": 5.0},
        class_teacher,
        {"source": str(label_folder)},
        steps=6,
    )
    Trainer(recipes.validate(data), tmp_path / "run").fit()
    import json

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    scales = [r["guidance_scale"] for r in rows if "guidance_scale" in r]
    assert len(scales) == 6 and all(1.5 <= w <= 5.0 for w in scales)
    assert len(set(scales)) == 6  # a fresh draw every step
    assert max(scales) - min(scales) > 0.5


def test_segment_schedule_lands_each_step_on_the_next_segment():
    from stillroom.plugins.diffusion.methods.consistency import segment_boundaries, segment_end

    grid = [(n + 1) * 20 - 1 for n in range(50)]
    bounds = segment_boundaries(grid, 4)
    assert bounds == [0, 259, 499, 759]
    assert segment_end(torch.tensor([999, 759, 760, 260, 259, 19]), bounds).tolist() == [
        759,
        499,
        759,
        259,
        0,
        0,
    ]
    assert math.isclose(float(gen.consistency_scalings(torch.tensor(0.0))[0]), 1.0)


COSINE = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "clip_sample": True}


def cosine_abar64():
    """abar_t of the squaredcos_cap_v2 schedule in float64 (Nichol & Dhariwal 2021, betas capped at 0.999)."""
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = torch.tensor([min(1 - f((i + 1) / 1000) / f(i / 1000), 0.999) for i in range(1000)])
    return torch.cumprod(1 - betas.double(), 0)


def test_student_predicts_v_where_epsilon_would_explode():
    from stillroom.plugins.diffusion.base import student_prediction

    ab = cosine_abar64()
    assert torch.allclose(gen.alphas_cumprod(COSINE), ab, rtol=1e-6)
    assert float(ab[-1]) ** 0.5 < 1e-4  # x0 = (x - sigma eps) / alpha amplifies eps errors by > 1e4
    assert student_prediction("auto", "epsilon", float(ab[-1])) == "v_prediction"
    sd = gen.alphas_cumprod(
        {
            "num_train_timesteps": 1000,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "beta_end": 0.012,
        }
    )
    assert student_prediction("auto", "epsilon", float(sd[-1])) == "epsilon"  # SD: 1/alpha ~ 15, as DMD2
    assert student_prediction("epsilon", "epsilon", float(ab[-1])) == "epsilon"
    assert student_prediction("auto", "v_prediction", float(ab[-1])) == "v_prediction"


def test_v_student_generator_matches_a_float64_reference():
    ab = cosine_abar64()
    ts = gen.ddim_timesteps(COSINE, 2)
    g = gen.FewStepGenerator(Recorder(), sampler(ts, prediction="v_prediction"), ab)
    noise, labels = torch.randn(2, 1, 4, 4), torch.tensor([3, 7])
    x, lab = noise.double(), labels.double().view(-1, 1, 1, 1)
    for i, t in enumerate(ts):
        nxt = ab[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
        v = ref_eps(x, t, lab)  # the Recorder's output read as v = alpha eps - sigma x0
        x0, eps = ab[t].sqrt() * x - (1 - ab[t]).sqrt() * v, (1 - ab[t]).sqrt() * x + ab[t].sqrt() * v
        x = nxt.sqrt() * x0 + (1 - nxt).sqrt() * eps
    assert torch.allclose(g(noise, labels).double(), x.clamp(-1, 1), atol=1e-4)


def test_teacher_step_clips_x0_and_rederives_eps_like_diffusers_ddim():
    from diffusers import DDIMScheduler

    from stillroom.plugins.diffusion.base import DiffusionMethod

    method = DiffusionMethod.__new__(DiffusionMethod)
    method.abar = cosine_abar64().float()
    method.teacher = type("T", (), {"prediction": "epsilon"})()
    method.clip_x0 = 1.0
    sched = DDIMScheduler.from_config(COSINE, timestep_spacing="trailing", set_alpha_to_one=True)
    sched.set_timesteps(10)
    torch.manual_seed(0)
    x, labels = torch.randn(3, 1, 4, 4), torch.tensor([1, 4, 9])
    for t, t_next in ((999, 899), (499, 399)):
        tt = torch.full((3,), t)
        x0, eps = method.x0_eps(Recorder(), x, tt, {"class_labels": labels})
        a, s = method.coeffs(torch.full((3,), t_next))
        ours = gen.ddim_step(x0, eps, a, s)
        ref_out = ref_eps(x.double(), t, labels.double().view(-1, 1, 1, 1))
        ref = sched.step(ref_out, t, x.double(), use_clipped_model_output=True).prev_sample
        assert x0.abs().max() <= 1.0
        assert torch.allclose(ours.double(), ref, atol=1e-4)
    # without the clamp the first step of this schedule is off by orders of magnitude
    method.clip_x0 = None
    x0, _ = method.x0_eps(Recorder(), x, torch.full((3,), 999), {"class_labels": labels})
    assert x0.abs().max() > 100


def test_hybrid_teacher_clips_x0_when_its_scheduler_does():
    ab = cosine_abar64()
    teacher, student = Recorder(), Recorder()
    s = gen.with_hybrid(sampler([999, 499]), "unused", 1000, 1, 499, None, "epsilon", 1.0)
    g = gen.FewStepGenerator(student, s, ab, teacher_unet=teacher)
    noise, labels = torch.randn(2, 1, 4, 4), torch.tensor([1, 5])
    g(noise, labels)
    x, lab = noise.double(), labels.double().view(-1, 1, 1, 1)
    eps = ref_eps(x, 999, lab)
    x0 = ((x - (1 - ab[999]).sqrt() * eps) / ab[999].sqrt()).clamp(-1, 1)
    eps = (x - ab[999].sqrt() * x0) / (1 - ab[999]).sqrt()  # re-derived from the clipped x0
    x = ab[499].sqrt() * x0 + (1 - ab[499]).sqrt() * eps
    assert torch.allclose(student.calls[0][1].double(), x, atol=1e-4)
    assert gen.retarget(s, COSINE, 2)["hybrid"]["clip_sample"] == 1.0
