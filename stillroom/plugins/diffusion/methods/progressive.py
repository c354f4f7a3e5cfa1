"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of
Diffusion Models", Algorithm 2).

Round r halves the sampler: the student takes one step on the N/2-step grid where the round's
teacher takes two DDIM steps on the N-step grid, t -> t' -> t''. With z_t = alpha_t x + sigma_t eps
the student's x-target is the clean image that makes *one* DDIM step from z_t land on z_t'':

    x_tilde = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t)

and the loss is w(lambda_t) ||x_tilde - x_hat_eta(z_t)||^2 with truncated-SNR weighting
w = max(alpha_t^2 / sigma_t^2, 1). The student predicts v (``student.prediction``, see
``base.student_prediction``): x_hat = alpha_t z_t - sigma_t v_hat stays bounded at t = T - 1, where an
epsilon student's x_hat = (z_t - sigma_t eps_hat) / alpha_t turns an eps error of 0.03 into an x error
of 600 on the cosine schedule (the paper's sec. 4 reason for x/v parametrisations). The teacher's
DDIM steps clamp x0 as its scheduler does (``clip_sample``). Round 0's teacher is the original
teacher with classifier-free guidance; each later round's teacher is the previous round's student
(guidance already baked in). Rounds take ``steps_per_round`` optimizer steps each (default:
train.steps / rounds): start_steps -> start_steps/2 -> ... -> student.steps.
"""

from __future__ import annotations

import copy
import logging
import math

import torch
from pydantic import Field

from stillroom.core.errors import StillroomError
from stillroom.core.method import Role, StepOutput
from stillroom.plugins.diffusion import sampler as gen
from stillroom.plugins.diffusion.base import DiffusionMethod, DiffusionParams

log = logging.getLogger(__name__)


class ProgressiveParams(DiffusionParams):
    start_steps: int = Field(
        32, ge=2, description="teacher DDIM steps of round 0 (a power of two times student)"
    )
    steps_per_round: int | None = Field(
        None, gt=0, description="optimizer steps per halving (default: train.steps split evenly over rounds)"
    )


def progressive_target(z_t, z_tpp, a_t, s_t, a_tpp, s_tpp):
    """x_tilde of Salimans & Ho (2022), Algorithm 2."""
    ratio = s_tpp / s_t
    return (z_tpp - ratio * z_t) / (a_tpp - ratio * a_t)


class Progressive(DiffusionMethod):
    name = "progressive"
    description = "progressive distillation: halve the DDIM steps each round (32 -> ... -> 1)"
    paper = "Salimans & Ho 2022, Progressive Distillation for Fast Sampling of Diffusion Models"
    Params = ProgressiveParams

    def extra_roles(self) -> dict[str, Role]:
        p, k = self.params, self.recipe.student.steps
        rounds = math.log2(p.start_steps / k)
        if rounds < 1 or rounds != int(rounds):
            raise StillroomError(
                f"method.start_steps={p.start_steps} must be student.steps={k} times 2^r (r >= 1)",
                "e.g. start_steps=32 with student.steps=1",
            )
        self.rounds, self.round = int(rounds), 0
        self.steps_per_round = p.steps_per_round or max(1, self.recipe.train.steps // self.rounds)
        self.previous = copy.deepcopy(self.student).eval().requires_grad_(False)
        return {"previous": Role(self.previous, trainable=False, checkpoint=True)}

    def current_round(self, step: int) -> int:
        return min(step // self.steps_per_round, self.rounds - 1)

    def grids(self, rnd: int) -> tuple[list[int], list[int]]:
        """(teacher 2N-step grid, student N-step grid) of round ``rnd`` (trailing DDIM spacing)."""
        n_teacher = self.params.start_steps // 2**rnd
        teacher = gen.ddim_timesteps(self.teacher.scheduler.config, n_teacher)
        return teacher, teacher[::2]

    def after_step(self, step: int, metrics: dict[str, float]) -> None:
        rnd = self.current_round(step + 1)
        if rnd != self.round:
            self.previous.load_state_dict(self.student.state_dict())
            self.round = rnd
            log.info("progressive round %d: student now learns %d steps", rnd, len(self.grids(rnd)[1]))

    def state_dict(self):
        return {"round": self.round}

    def load_state_dict(self, state):
        self.round = int(state.get("round", 0))

    def loss(self, role: str, batch, step: int) -> StepOutput:
        x0 = batch["x0"]
        b = x0.shape[0]
        dev = x0.device
        teacher_grid, _ = self.grids(self.round)
        grid = torch.tensor(teacher_grid + [-1], device=dev)
        i = torch.randint(0, len(teacher_grid) // 2, (b,), device=dev) * 2
        t, tp, tpp = grid[i], grid[i + 1], grid[i + 2]
        eps = torch.randn_like(x0)
        z_t = self.add_noise(x0, t, eps)
        with torch.no_grad():
            z_tp = self._teacher_step(z_t, t, tp, batch)
            z_tpp = self._teacher_step(z_tp, tp, tpp, batch)
        a_t, s_t = self.coeffs(t)
        a_tpp, s_tpp = self.coeffs(tpp)
        target = progressive_target(z_t, z_tpp, a_t, s_t, a_tpp, s_tpp)
        x_hat, _ = self.student_x0_eps(self.student, z_t, t, batch["cond"])
        weight = (a_t**2 / s_t**2).clamp(min=1.0)
        loss = (weight * (x_hat.float() - target.float()) ** 2).mean()
        return StepOutput(loss, {"round": float(self.round)})

    def _teacher_step(self, z, t, t_next, batch):
        if self.round == 0:
            x0, eps = self.x0_eps(
                self.teacher.unet, z, t, batch["cond"], batch["uncond"], self.recipe.teacher.guidance
            )
        else:
            x0, eps = self.student_x0_eps(self.previous, z, t, batch["cond"])
        a, s = self.coeffs(t_next)
        return gen.ddim_step(x0, eps, a, s)

    def schedule(self):
        return self.grids(self.round)[1], None
