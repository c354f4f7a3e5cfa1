"""Marginal-Data Transport distillation, MDT-dist (Zhou, Yi, Fang, Yang, Xie, Wang, Shen & Tian 2025,
"Few-step Flow for 3D Generation via Marginal-Data Transport Distillation", arXiv 2509.04406), on a
flow-matching teacher.

Flow convention: x_t = (1 - t) x0 + t eps, t in (0, 1] (t = 1 is noise); the teacher's guided velocity is
v_w(x, t) = v(x, t, null) + w (v(x, t, y) - v(x, t, null)) and its ODE dx/dt = v_w carries every
marginal x_t to the data end. The student v_theta (a "flow" student copied from the teacher) defines
the *marginal-data transport*

    Phi_theta(x_t, t) = x_t - t v_theta(x_t, t)                  (its x0; one step: x0 = z - v_theta(z, 1))

and MDT asks Phi_theta(x_t, t) = x_t - int_0^t v_w(x_s, s) ds, the teacher's own transport, which needs
the intractable integral. Since the teacher's transport is constant along its ODE, differentiating
along dx/dt = v_w gives an equivalent condition on velocities:

    d/dt Phi_theta = 0   <=>   v_theta(x_t, t) = v_w(x_t, t) - t D,
    D = d/dt v_theta(x_t, t)   (the total derivative along v_w)

**Velocity Matching** (VM) regresses on that target, x_t noised from data, D by one teacher Euler step of
length Delta (``interval``), normalised per sample (D / (||D|| + c), c = ``d_norm``, as the authors'
implementation does; null disables it):

    x' = x_t - Delta v_w(x_t, t),   D = (v_theta(x_t, t) - v_theta(x', t - Delta)) / Delta
    L_VM = E_{x0, eps, t} || v_theta(x_t, t) - sg( v_w(x_t, t) - t D ) ||^2

**Velocity Distillation** (VD) turns the same residual into a density-distillation gradient on the
student's own one-step samples x_hat = z - v_theta(z, 1): re-noised x_t = (1 - t) sg(x_hat) + t eps,
the residual r = v_theta(x_t, t) - (v_w(x_t, t) - t D) (all without gradient) is pushed through the
sample,

    L_VD = E_{z, eps, t} || sg(r) + v_theta(z, 1) - sg(v_theta(z, 1)) ||^2,
    grad_theta L_VD = 2 E[ r . d v_theta(z, 1) / d theta ] = -2 E[ r . d x_hat / d theta ]

and L = lambda_VM L_VM + lambda_VD L_VD, with t ~ logit-normal(t_mean, t_std) mapped to [Delta, 1]
(the paper's t schedule). VM reads the data (``data.source``); VD needs none.
"""

from __future__ import annotations

import torch
from pydantic import Field

from stillroom.core.method import StepOutput
from stillroom.plugins.diffusion.base import DiffusionMethod, DiffusionParams


class MDTParams(DiffusionParams):
    interval: float = Field(0.01, gt=0, lt=0.5, description="Delta: the teacher Euler step that estimates D")
    lambda_vm: float = Field(1.0, ge=0, description="weight of velocity matching")
    lambda_vd: float = Field(1.0, ge=0, description="weight of velocity distillation")
    t_mean: float = Field(1.0, description="logit-normal t schedule: mean of the logit")
    t_std: float = Field(1.0, gt=0, description="logit-normal t schedule: std of the logit")
    d_norm: float | None = Field(0.1, gt=0, description="c in D / (||D|| + c); null: no normalisation")


def normalised(d: torch.Tensor, c: float | None) -> torch.Tensor:
    """D / (||D|| + c) per sample; D unchanged when c is None."""
    if c is None:
        return d
    return d / (torch.linalg.vector_norm(d, dim=tuple(range(1, d.dim())), keepdim=True) + c)


class MDT(DiffusionMethod):
    name = "mdt"
    description = "marginal-data transport distillation of a flow teacher: velocity matching + distillation"
    paper = "Zhou et al. 2025, Few-step Flow for 3D Generation via Marginal-Data Transport Distillation"
    Params = MDTParams
    teachers = ("flow",)
    student_predictions = ("flow",)

    def sample_t(self, b: int) -> torch.Tensor:
        p = self.params
        t = torch.sigmoid(torch.randn(b, device=self.ctx.device) * p.t_std + p.t_mean)
        return p.interval + (1 - p.interval) * t

    @torch.no_grad()
    def vm_target(self, x_t: torch.Tensor, t: torch.Tensor, v_student: torch.Tensor, batch) -> torch.Tensor:
        """sg(v_w(x_t, t) - t D) with D from one teacher Euler step of length Delta."""
        p, cond = self.params, batch["cond"]
        v_w = self.velocity(self.teacher.unet, x_t, t, cond, batch["uncond"], self.recipe.teacher.guidance)
        x_prev = x_t - p.interval * v_w
        v_prev = self.velocity(self.student, x_prev, t - p.interval, cond)
        d = normalised((v_student - v_prev) / p.interval, p.d_norm)
        return v_w - t.view(-1, 1, 1, 1) * d

    def noised(self, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tb = t.view(-1, 1, 1, 1)
        return (1 - tb) * x0 + tb * torch.randn_like(x0)

    def loss(self, role, batch, step) -> StepOutput:
        p, cond = self.params, batch["cond"]
        b = self.batch_size(batch)
        loss, metrics = 0.0, {}
        if p.lambda_vm > 0:
            t = self.sample_t(b)
            x_t = self.noised(batch["x0"], t)
            v = self.velocity(self.student, x_t, t, cond)
            vm = torch.nn.functional.mse_loss(v.float(), self.vm_target(x_t, t, v.detach(), batch).float())
            loss, metrics["vm"] = loss + p.lambda_vm * vm, vm.item()
        if p.lambda_vd > 0:
            z = torch.randn(self.noise_shape(b), device=self.ctx.device)
            v_fake = self.velocity(self.student, z, torch.ones(b, device=self.ctx.device), cond)
            t = self.sample_t(b)
            with torch.no_grad():
                x_t = self.noised(z - v_fake, t)
                v = self.velocity(self.student, x_t, t, cond)
                r = v - self.vm_target(x_t, t, v, batch)
            vd = ((r + v_fake - v_fake.detach()).float() ** 2).mean()
            loss, metrics["vd"] = loss + p.lambda_vd * vd, vd.item()
        return StepOutput(loss, metrics)
