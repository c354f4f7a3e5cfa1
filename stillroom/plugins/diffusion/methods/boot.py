"""BOOT (Gu et al. 2023, "BOOT: Data-free Distillation of Denoising Diffusion Models with Bootstrapping").

A one-step generator g_theta(eps, t) reads only noise eps ~ N(0, I) (and the condition) and predicts the
*signal* of the teacher's DDIM trajectory that starts at eps,

    y_t = (x_t - sigma_t eps) / alpha_t,        y_0 = x_0 (the image),

where x_t follows the teacher's (CFG) ODE from x_T = eps. One DDIM step of the teacher from t to s < t,
x_s = alpha_s x0_hat + sigma_s (x_t - alpha_t x0_hat) / sigma_t with x0_hat = f_phi(x_t, t), is in signal
space (eps cancels; BOOT sec. 3, the discretised Signal-ODE dy/dt = -lambda'_t (f_phi(x_t, t) - y_t)):

    y_s = y_t + delta_t (f_phi(x_t, t) - y_t),   delta_t = 1 - exp(lambda_s - lambda_t),
    lambda_t = -log(alpha_t / sigma_t).

Bootstrapping objective (BOOT sec. 3): the student's prediction at s is matched to one teacher step applied
to the student's own prediction at the previous (noisier) timestep t,

    L_BS = E_{eps, t} [ 1 / delta_t^2 || g_theta(eps, s) - sg[ y_t + delta_t (f_phi^w(x_t, t) - y_t) ] ||^2 ],
    y_t = sg[g_theta(eps, t)],  x_t = alpha_t y_t + sigma_t eps,

plus the boundary condition at t = T (where x_T = eps): L_BC = || g_theta(eps, T) - f_phi^w(eps, T) ||^2.
f_phi^w is the teacher's x0 with CFG scale w, clipped as its DDIM sampler clips it. (s, t) are consecutive
points of an N-point grid from the noisiest timestep (T - 1 on a VP schedule, T = pure noise on a flow
one) down to 0 (``grid_steps``); squared norms are means over pixels.
The student is a copy of the teacher's UNet fed eps at every t; it samples in one step, y_0 = g(eps, 0)
(sampler timestep 0, ``sample`` prediction). No image is read (``DataFreeMethod``).
"""

from __future__ import annotations

import torch
from pydantic import Field

from stillroom.core.errors import StillroomError
from stillroom.core.method import StepOutput
from stillroom.plugins.diffusion import models as dm
from stillroom.plugins.diffusion.base import DiffusionParams
from stillroom.plugins.diffusion.datafree import DataFreeMethod


class BOOTParams(DiffusionParams):
    grid_steps: int = Field(50, ge=2, description="N: points of the bootstrapping grid top -> 0")
    boundary_weight: float = Field(1.0, ge=0, description="weight of the boundary loss at the top")


def boot_grid(timesteps: int, n: int) -> list[int]:
    """N + 1 integer timesteps from the schedule's noisiest (``timesteps - 1``: T - 1 on VP, T on flow)
    down to 0, evenly spaced."""
    top = timesteps - 1
    return [round(top * (n - i) / n) for i in range(n + 1)]


def signal_step(y_t, x0_t, delta):
    """One teacher DDIM step in signal space: y_s = y_t + delta (x0_hat(x_t, t) - y_t)."""
    return y_t + delta * (x0_t - y_t)


def boot_delta(a_t, s_t, a_s, s_s):
    """delta_t = 1 - exp(lambda_s - lambda_t) = 1 - (sigma_s alpha_t) / (alpha_s sigma_t)."""
    return 1 - (s_s * a_t) / (a_s * s_t)


class BOOT(DataFreeMethod):
    name = "boot"
    description = "data-free one-step distillation by bootstrapping the teacher's signal-ODE (BOOT)"
    paper = "Gu et al. 2023, BOOT: Data-free Distillation of Denoising Diffusion Models with Bootstrapping"
    Params = BOOTParams

    def extra_roles(self):
        spec = self.recipe.student
        if spec.steps != 1:
            raise StillroomError("boot trains one-step generators", "set student.steps=1")
        if spec.prediction not in ("auto", "sample"):
            raise StillroomError(
                f"boot's student predicts the signal y_t, not {spec.prediction}",
                "set student.prediction=auto",
            )
        self.student_prediction = "sample"
        self.grid = torch.tensor(boot_grid(self.top + 1, self.params.grid_steps), device=self.ctx.device)
        return {}

    def g(self, eps: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """The student's signal prediction g_theta(eps, t)."""
        return self.student(eps, t, **dm.unet_kwargs(cond)).sample

    def loss(self, role, batch, step) -> StepOutput:
        cond, uncond, w = batch["cond"], batch["uncond"], self.recipe.teacher.guidance
        b = self.batch_size(batch)
        eps = torch.randn(self.noise_shape(b), device=self.ctx.device)
        n = torch.randint(0, self.params.grid_steps, (b,), device=self.ctx.device)
        t, s = self.grid[n], self.grid[n + 1]
        top = torch.full_like(t, self.top)
        a_t, s_t = self.coeffs(t)
        a_s, s_s = self.coeffs(s)
        delta = boot_delta(a_t, s_t, a_s, s_s)
        with torch.no_grad():
            y_t = self.g(eps, t, cond)
            x0_t, _ = self.x0_eps(self.teacher.unet, a_t * y_t + s_t * eps, t, cond, uncond, w)
            target = signal_step(y_t, x0_t, delta)
            y_top, _ = self.x0_eps(self.teacher.unet, eps, top, cond, uncond, w)
        both = {k: v if v is None else torch.cat([v, v]) for k, v in cond.items()}
        pred = self.g(torch.cat([eps, eps]), torch.cat([s, top]), both).float()
        per_sample = ((pred[:b] - target.float()) ** 2).flatten(1).mean(1)
        bootstrap = (per_sample / delta.flatten().float() ** 2).mean()
        boundary = ((pred[b:] - y_top.float()) ** 2).mean()
        loss = bootstrap + self.params.boundary_weight * boundary
        return StepOutput(loss, {"bootstrap": bootstrap.item(), "boundary": boundary.item()})

    def schedule(self):
        return [0], None
