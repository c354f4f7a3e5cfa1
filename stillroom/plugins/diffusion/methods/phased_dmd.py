"""Phased DMD (Fan et al. 2025, "Phased DMD: Few-step Distribution Matching Distillation via Score
Matching within Subintervals"): DMD (``dmd2.py``) phase by phase, one expert per SNR subinterval.

The K-step sampler's timesteps are split into P phases of K / P steps; phase p starts at the
timestep b_p (b_0 = T - 1) and ends at s = b_{p+1} (s = -1, the clean end, for the last phase). The
student is a mixture of experts (``experts.PhasedExperts``): expert p makes the steps of phase p.
Phases train one after another, ``steps_per_phase`` optimizer steps each (progressive distribution
matching), and only expert p gets gradients in phase p; the experts of earlier phases, already
trained, produce its inputs.

Generator (phase p). Back-simulation stops at the phase's end: the student's own steps (no
gradient) reach a random step j of phase p, whose prediction jumps to s with gradient,
x_s = alpha_s x0_hat + sigma_s eps_hat (a DDIM jump). Diffusing on from s,

    x_t = alpha_{t|s} x_s + sigma_{t|s} eps,   alpha_{t|s} = alpha_t / alpha_s,
    sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2,       t ~ U{max(s + 1, t_min T), ..., t_max T}

(the paper samples t in (t_k, 1), not only inside the phase). DMD's gradient in x_s-space uses each
score's denoiser of the subinterval, E[x_s | x_t] (Tweedie on the transition s -> t, with
E[eps_{t|s} | x_t] = (sigma_{t|s} / sigma_t) E[eps | x_t]):

    x_s_hat(x_t) = (x_t - (sigma_{t|s}^2 / sigma_t) eps_hat(x_t, t)) / alpha_{t|s}
    grad = (x_s_hat_fake - x_s_hat_real) / mean |x_s - x_s_hat_real|    (``dmd2.dmd_gradient``)

which is the reverse-KL gradient alpha_{t|s} (s_fake - s_real) up to a positive per-sample scale,
and for s = -1 is exactly DMD2's x0-space gradient.

Fake score (subinterval score matching, the paper's eq. 11/13 written for an epsilon network).
No clean x_0 exists for an intermediate phase, only x_s. Since grad log p_t(x_t) =
-E[eps_{t|s} | x_t] / sigma_{t|s} = -E[eps | x_t] / sigma_t, the unbiased regression target of the
critic's eps_phi(x_t, t) at t ~ U{s + 1, ..., T - 1} is (sigma_t / sigma_{t|s}) eps_{t|s}:

    L_fake = E[ w ||eps_phi(x_t, t) - (sigma_t / sigma_{t|s}) eps_{t|s}||^2 ],  w = sigma_{t|s}^2 / sigma_t^2
           = E[ ||(sigma_{t|s} / sigma_t) eps_phi(x_t, t) - eps_{t|s}||^2 ]

Regressing on eps_{t|s} as if x_s were clean (the naive objective) is biased. The target's variance
grows as 1 / sigma_{t|s}^2 when t -> s; the paper clamps a 1 / sigma_{t|s}^2 factor to [0, 10], here
the per-t weight w <= 1 bounds it instead (a per-t weight keeps the minimiser). For s = -1 this is
DMD2's critic loss. The critic (DMD2's, a copy of the teacher) is reset to the teacher at the start
of every phase, as in the paper, and steps ``critic_updates`` times per generator step.

Flow teachers (x_t = (1 - t/T) x0 + (t/T) eps, t = 0..T) reach both endpoints. sigma_t = 0 only at t = 0,
which only the last phase (s = -1) draws, and there sigma_{t|s} = sigma_t at every t, so the ratio
sigma_{t|s} / sigma_t is taken as its value 1 (``noise_ratio``), not 0 / 0: the critic's loss at t = 0 is
DMD2's ||eps_phi(x_0, 0) - eps||^2 (a velocity critic learns v(x_0, 0) = -x_0) and the denoiser is the
identity, E[x_0 | x_0] = x_0. alpha_t = 0 only at t = T (pure noise): the critic's loss there is finite
(alpha_{t|s} = 0, sigma_{t|s} = sigma_t = 1), and the generator, whose t < t_max T <= T, never asks for
E[x_s | x_t] there (which has no Tweedie form: x_T carries nothing of x_s).
"""

from __future__ import annotations

import copy
import logging

import torch
from pydantic import Field

from stillroom.core.errors import StillroomError
from stillroom.core.method import StepOutput
from stillroom.plugins.diffusion import sampler as gen
from stillroom.plugins.diffusion.base import score_distillation_loss
from stillroom.plugins.diffusion.experts import PhasedExperts
from stillroom.plugins.diffusion.methods.dmd2 import DMD2, DMD2Params, dmd_gradient

log = logging.getLogger(__name__)


class PhasedDMDParams(DMD2Params):
    phases: int | None = Field(
        None,
        ge=1,
        description="experts (SNR subintervals); divides student.steps; default 2 if it is even, else 1",
    )
    steps_per_phase: int | None = Field(
        None, gt=0, description="optimizer steps per phase (default: train.steps split evenly)"
    )


def transition(a_t, s_t, a_s, s_s):
    """(alpha_{t|s}, sigma_{t|s}) of x_t | x_s for x_t = a_t x0 + s_t eps, x_s = a_s x0 + s_s eps'."""
    a_ts = a_t / a_s
    return a_ts, (s_t**2 - a_ts**2 * s_s**2).clamp(min=0).sqrt()


def noise_ratio(s_ts, s_t):
    """sigma_{t|s} / sigma_t, and 1 where sigma_t = 0 (a flow's t = 0, drawn only with s = -1, where
    sigma_{t|s} = sigma_t identically; sigma_{t|s} <= sigma_t makes it 0 / 0 there otherwise)."""
    noisy = s_t > 0
    return torch.where(noisy, s_ts, 1) / torch.where(noisy, s_t, 1)


def subinterval_denoise(x_t, eps_hat, a_ts, s_ts, s_t):
    """E[x_s | x_t] from a network's E[eps | x_t]: (x_t - (sigma_{t|s}^2 / sigma_t) eps_hat) / alpha_{t|s}."""
    return (x_t - noise_ratio(s_ts, s_t) * s_ts * eps_hat) / a_ts


def subinterval_score_loss(eps_phi, eps_ts, s_ts, s_t):
    """mean ||(sigma_{t|s} / sigma_t) eps_phi - eps_{t|s}||^2: the unbiased subinterval objective,
    weighted by sigma_{t|s}^2 / sigma_t^2, of a critic that sees only x_s."""
    return torch.nn.functional.mse_loss(noise_ratio(s_ts, s_t) * eps_phi.float(), eps_ts.float())


class PhasedDMD(DMD2):
    name = "phased_dmd"
    description = "phased DMD: one expert per SNR subinterval, trained phase by phase (mixture of experts)"
    paper = (
        "Fan et al. 2025, Phased DMD: Few-step Distribution Matching Distillation via Score Matching "
        "within Subintervals"
    )
    Params = PhasedDMDParams
    needs_images = False

    def make_student(self) -> torch.nn.Module:
        k = self.recipe.student.steps
        p = self.params.phases or (2 if k % 2 == 0 else 1)
        if k % p:
            raise StillroomError(
                f"student.steps={k} cannot be split into method.phases={p} equal phases",
                "make student.steps a multiple of method.phases (e.g. 4 steps, 2 phases)",
            )
        if self.params.gan_weight > 0:
            raise StillroomError("phased_dmd has no GAN head", "set method.gan_weight=0 (or use dmd2)")
        first = super().make_student()
        timesteps = self.schedule()[0]
        self.per_phase = k // p
        self.starts = [int(t) for t in timesteps[:: self.per_phase]]
        experts = [first] + [copy.deepcopy(first) for _ in range(p - 1)]
        self.phase = 0
        self.steps_per_phase = self.params.steps_per_phase or max(1, self.recipe.train.steps // p)
        return PhasedExperts(experts, self.starts[1:]).to(self.ctx.device)

    # -- the phase schedule ---------------------------------------------------------------------
    def end(self) -> int:
        """s: the timestep where the current phase hands over (-1: the clean end)."""
        return self.starts[self.phase + 1] if self.phase + 1 < len(self.starts) else -1

    def after_step(self, step: int, metrics: dict[str, float]) -> None:
        phase = min((step + 1) // self.steps_per_phase, len(self.starts) - 1)
        if phase != self.phase:
            self.phase = phase
            self.critic.load_state_dict(self.teacher.unet.state_dict())
            log.info("phased_dmd phase %d: training expert %d down to t=%d", phase, phase, self.end())

    def state_dict(self):
        return {"phase": self.phase}

    def load_state_dict(self, state):
        self.phase = int(state.get("phase", 0))

    # -- losses -----------------------------------------------------------------------------------
    def phase_sample(self, batch) -> tuple[torch.Tensor, int]:
        """(x_s with gradient through expert ``phase`` only, the step j it was made at)."""
        g = self.generator()
        cond = batch["cond"]
        labels, hidden = cond.get("class_labels"), cond.get("encoder_hidden_states")
        x = torch.randn(self.noise_shape(self.batch_size(batch)), device=self.ctx.device)
        j = self.phase * self.per_phase + int(torch.randint(0, self.per_phase, ()).item())
        with torch.no_grad():
            for i in range(j):
                x = gen.ddim_step(*g.denoise(i, x, labels, hidden), g.s_a_next[i], g.s_s_next[i])
        x0, eps = g.denoise(j, x, labels, hidden)
        a_s, s_s = self.coeffs(torch.full((x.shape[0],), self.end(), device=x.device))
        return gen.ddim_step(x0, eps, a_s, s_s), j

    def diffuse(self, x_s, t):
        """(x_t, eps_{t|s}, alpha_{t|s}, sigma_{t|s}, sigma_t): x_s diffused from the phase end s to t."""
        a_t, s_t = self.coeffs(t)
        a_s, s_s = self.coeffs(torch.full_like(t, self.end()))
        a_ts, s_ts = transition(a_t, s_t, a_s, s_s)
        eps = torch.randn_like(x_s)
        return a_ts * x_s + s_ts * eps, eps, a_ts, s_ts, s_t

    def critic_t(self, b, dev):
        """t ~ U{s + 1, ..., top}: the critic models the phase's output at every noisier level."""
        return torch.randint(self.end() + 1, self.top + 1, (b,), device=dev)

    def random_t(self, b, dev):
        lo = max(self.end() + 1, int(self.params.t_min * self.T))
        hi = max(int(self.params.t_max * self.T), lo + 1)
        return torch.randint(lo, hi, (b,), device=dev)

    def critic_loss(self, batch) -> StepOutput:
        with torch.no_grad():
            x_s, _ = self.phase_sample(batch)
        t = self.critic_t(x_s.shape[0], x_s.device)
        x_t, eps_ts, _, s_ts, s_t = self.diffuse(x_s, t)
        _, eps_phi = self.x0_eps(self.critic, x_t, t, batch["cond"], clip=False)
        loss = subinterval_score_loss(eps_phi, eps_ts, s_ts, s_t)
        return StepOutput(loss, {"critic_denoise": loss.item(), "phase": float(self.phase)})

    def generator_loss(self, batch) -> StepOutput:
        x_s, j = self.phase_sample(batch)
        t = self.random_t(x_s.shape[0], x_s.device)
        x_t, _, a_ts, s_ts, s_t = self.diffuse(x_s, t)
        with torch.no_grad():
            _, eps_real = self.x0_eps(
                self.teacher.unet, x_t, t, batch["cond"], batch["uncond"], self.recipe.teacher.guidance
            )
            _, eps_fake = self.x0_eps(self.critic, x_t, t, batch["cond"])
            grad = dmd_gradient(
                x_s,
                subinterval_denoise(x_t, eps_real, a_ts, s_ts, s_t),
                subinterval_denoise(x_t, eps_fake, a_ts, s_ts, s_t),
            )
        loss = score_distillation_loss(x_s, grad)
        metrics = {"dm": loss.item(), "dm_grad_norm": grad.norm().item() / x_s.shape[0] ** 0.5}
        return StepOutput(loss, {**metrics, "sim_step": float(j), "phase": float(self.phase)})
