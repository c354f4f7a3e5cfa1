"""Image-free continuous-time consistency distillation on trajectory-sampled pairs (TBCM: "Image-Free
Timestep Distillation via Continuous-Time Consistency with Trajectory-Sampled Pairs", 2025), with the
continuous-time objective of sCM (Lu & Song 2024, "Simplifying, Stabilizing and Scaling Continuous-Time
Consistency Models") in its finite-difference form.

Training points: no image is noised. Every batch slot follows the teacher's own CFG DDIM trajectory from
pure noise (``datafree.TeacherTrajectories``) on LCM's N-point grid t_n = (n + 1) T/N - 1, ending at 0;
one training step takes the pair of consecutive points (x_t, x_s), s < t, that one teacher step joins,
so both lie on the teacher's probability-flow ODE.

Consistency function: LCM's boundary parametrisation with one segment (``Consistency.consistency_fn``,
e = 0), f(x, 0) = x. Continuous-time consistency asks df_theta(x_t, t)/dt = 0 along the ODE. sCM's loss
with the stop-gradient tangent, written with the finite difference of the trajectory pair instead of a
Jacobian-vector product:

    g = (f_theta-(x_t, t) - f_theta-(x_s, s)) / ((t - s) / T)        (~ df_theta-/dt along the ODE)
    g_hat = g / (||g||_2 + c)                                         (sCM tangent normalisation, c = 0.1)
    w(t) = 1 / (sigma_d tan(tau_t)) = a_t / s_t                       (sCM's prior time weighting)
    L(theta) = E w(t) || f_theta(x_t, t) - sg(f_theta(x_t, t) - g_hat) ||_2^2,   theta- = sg(theta)

so grad_theta L = 2 E[w(t) (d f_theta(x_t, t) / d theta)^T g_hat]: each step moves f at t toward f at s
by a step of bounded size, whatever the local slope (norms over each sample's C x H x W values). As
(t - s) -> 0 the gradient is sCM's continuous-time one, grad E[w(t) f_theta^T df_theta-/dt];
with theta- = sg(theta) there is no EMA target. The weight is sCM's prior weighting: in TrigFlow time
tau, x = cos(tau) x0 + sin(tau) z with z ~ N(0, sigma_d^2 I), so sigma_d tan(tau) is the noise-to-signal
ratio s_t / a_t of x_t = a_t x0 + s_t eps on any schedule (sigma_d cancels). It turns sCM's f-space
gradient into its network-output loss || F_theta - F_theta- - cos(tau) g_hat ||^2 (f = cos(tau) x -
sigma_d sin(tau) F): a bounded push on the *network output*, largest near the data, where the boundary
f(x, 0) = x anchors the chain. With w = 1 the push on the output is |df / dF| ~ s_t instead, so the
nearly-pure-noise pairs, whose f is least consistent, dominate the gradient and drown the anchor (on the
embedded MNIST teacher the student fell to near-chance class accuracy within 100 steps at lr 1e-4). sCM's
learned adaptive weighting and its tangent warm-up are not used.
The student samples like an LCM student: ``student.steps`` trailing DDIM steps, boundary ends 0.
"""

from __future__ import annotations

import torch
from pydantic import Field

from stillroom.core.method import StepOutput
from stillroom.plugins.diffusion import sampler as gen
from stillroom.plugins.diffusion.base import DiffusionParams
from stillroom.plugins.diffusion.datafree import DataFreeMethod, TeacherTrajectories
from stillroom.plugins.diffusion.methods.consistency import Consistency


class TBCMParams(DiffusionParams):
    ddim_steps: int = Field(50, ge=2, description="N: points of the teacher trajectories' DDIM grid")
    tangent_c: float = Field(0.1, gt=0, description="sCM tangent normalisation constant c")
    sigma_data: float = Field(0.5, gt=0)
    timestep_scaling: float = Field(10.0, gt=0)


def normalized_tangent(f_t: torch.Tensor, f_s: torch.Tensor, dt: torch.Tensor, c: float) -> torch.Tensor:
    """g / (||g||_2 + c) with g = (f_t - f_s) / dt, the norm over each sample's values."""
    g = (f_t - f_s) / dt.view(-1, *([1] * (f_t.dim() - 1)))
    norm = g.flatten(1).norm(dim=1).view(-1, *([1] * (f_t.dim() - 1)))
    return g / (norm + c)


class TBCM(DataFreeMethod):
    name = "tbcm"
    description = "image-free continuous-time consistency distillation on the teacher's trajectory pairs"
    paper = (
        "Image-Free Timestep Distillation via Continuous-Time Consistency with Trajectory-Sampled Pairs, 2025"
    )
    Params = TBCMParams
    consistency_fn = Consistency.consistency_fn

    def extra_roles(self):
        n, w = self.params.ddim_steps, float(self.recipe.teacher.guidance or 1.0)
        self.trajectories = TeacherTrajectories(self, self.lcm_grid(n)[::-1], self.fixed_scale(w), end=0)
        return {}

    def fixed_scale(self, w: float):
        return lambda b: torch.full((b,), w, device=self.ctx.device)

    def loss(self, role, batch, step) -> StepOutput:
        x_t, t, cond, _, _ = self.trajectories.current(batch)
        x_s, s = self.trajectories.advance()
        zero = torch.zeros_like(t)
        f = self.consistency_fn(self.student, x_t, t, zero, cond, None).float()
        with torch.no_grad():
            f_s = self.consistency_fn(self.student, x_s, s, zero, cond, None).float()
            g = normalized_tangent(f.detach(), f_s, (t - s).float() / self.T, self.params.tangent_c)
            a, sigma = self.coeffs(t)
            w = (a / sigma).flatten().float()
        loss = (w * ((f - (f - g).detach()) ** 2).flatten(1).sum(1)).mean()
        gap = (f.detach() - f_s).pow(2).flatten(1).mean(1).mean()
        return StepOutput(loss, {"consistency_gap": gap.item(), "t_mean": t.float().mean().item()})

    def schedule(self):
        ts = gen.ddim_timesteps(self.teacher.scheduler.config, self.recipe.student.steps)
        p = self.params
        return ts, {"sigma_data": p.sigma_data, "timestep_scaling": p.timestep_scaling, "ends": [0] * len(ts)}
