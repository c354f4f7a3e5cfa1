"""Adapter guidance distillation (Jensen & Sadat 2025, "Efficient Distillation of Classifier-Free
Guidance using Adapters", AGD).

The teacher stays frozen; small adapters conditioned on the guidance scale w
(``stillroom.plugins.diffusion.guidance_adapter``) learn to make ONE forward pass of the adapted UNet
eps_psi reproduce classifier-free guidance (Ho & Salimans 2022), which costs two:

    L(psi) = E_{w, c, (x_t, t) ~ CFG trajectory} || eps_psi(x_t, t, c, w) - eps_w(x_t, t, c) ||^2,
    eps_w(x_t, t, c) = eps(x_t, t, null) + w (eps(x_t, t, c) - eps(x_t, t, null))

(outputs in the teacher's own parametrisation). AGD's point against earlier guidance
distillation is where (x_t, t) come from: not from noised data but from the teacher's own CFG-guided
sampling trajectories, so no dataset is read. Here every batch slot carries one guided
teacher DDIM trajectory from pure noise on a ``trajectory_steps`` grid, moved one step per training step
(``datafree.TeacherTrajectories``), with w ~ U[guidance_min, guidance_max] drawn per trajectory.

The student directory is the teacher's untouched ``unet/`` plus ``guidance_adapter/``; its sampler is the
teacher's DDIM on ``student.steps`` trailing steps with ``guidance_embed`` (w is a graph input, default
``teacher.guidance``) and one network evaluation per step instead of CFG's two.
"""

from __future__ import annotations

import copy

import torch
from pydantic import Field
from torch.nn import functional as F

from stillroom.core.errors import StillroomError
from stillroom.core.method import StepOutput
from stillroom.plugins.diffusion import models as dm
from stillroom.plugins.diffusion import sampler as gen
from stillroom.plugins.diffusion.base import DiffusionParams
from stillroom.plugins.diffusion.datafree import DataFreeMethod, TeacherTrajectories
from stillroom.plugins.diffusion.guidance_adapter import GuidanceAdaptedUNet


class AGDParams(DiffusionParams):
    rank: int = Field(8, gt=0, description="channels inside each offset adapter")
    embed_dim: int = Field(32, ge=4, multiple_of=2, description="sinusoidal guidance-embedding size")
    hidden: int = Field(64, gt=0, description="width of the adapters' shared (w, t) conditioning")
    guidance_min: float = Field(1.0, ge=1, description="lower end of the trained guidance scales")
    guidance_max: float = Field(4.0, ge=1, le=16, description="upper end (the adapters read w up to 16)")
    trajectory_steps: int = Field(50, ge=2, description="DDIM grid of the teacher's guided trajectories")


class AGD(DataFreeMethod):
    name = "agd"
    description = "adapter guidance distillation: CFG in one forward pass of the frozen teacher + adapters"
    paper = "Jensen & Sadat 2025, Efficient Distillation of Classifier-Free Guidance using Adapters"
    Params = AGDParams

    def make_student(self) -> GuidanceAdaptedUNet:
        if self.recipe.student.init:
            raise StillroomError("agd adapts the frozen teacher; student.init does not apply", "remove it")
        p = self.params
        student = GuidanceAdaptedUNet(
            copy.deepcopy(self.teacher.unet),
            self.abar,
            p.rank,
            p.embed_dim,
            p.hidden,
            self.clip_x0,
            self.teacher.prediction,
        )
        return student.to(self.ctx.device).train()

    def extra_roles(self):
        p, w = self.params, self.recipe.teacher.guidance
        if p.guidance_max < p.guidance_min:
            raise StillroomError("method.guidance_max is below method.guidance_min", "swap them")
        if w is None or not p.guidance_min <= w <= p.guidance_max:
            raise StillroomError(
                f"teacher.guidance {w} must lie in [guidance_min, guidance_max] = "
                f"[{p.guidance_min}, {p.guidance_max}] (it is the sampler's default scale)",
                "set teacher.guidance inside the trained range",
            )
        grid = gen.ddim_timesteps(self.teacher.scheduler.config, p.trajectory_steps)
        self.trajectories = TeacherTrajectories(self, grid, self.draw_scale)
        return {}

    def draw_scale(self, b: int) -> torch.Tensor:
        """w ~ U[guidance_min, guidance_max], one per trajectory."""
        p = self.params
        return p.guidance_min + (p.guidance_max - p.guidance_min) * torch.rand(b, device=self.ctx.device)

    def loss(self, role, batch, step) -> StepOutput:
        x, t, cond, uncond, w = self.trajectories.current(batch)
        with torch.no_grad():
            target = dm.cfg_output(self.teacher.unet, x, t, cond, uncond, w)
        embed = gen.guidance_embedding(w, self.params.embed_dim).to(x.dtype)
        pred = self.student.guided(x, t, embed, **dm.unet_kwargs(cond))
        loss = F.mse_loss(pred.float(), target.float())
        self.trajectories.advance()
        return StepOutput(loss, {"agd": loss.item(), "t_mean": t.float().mean().item()})

    def sampler(self):
        out = super().sampler()
        out.update(
            guidance=self.recipe.teacher.guidance,
            guidance_embed=True,
            prediction=self.student.sampler_prediction,
        )
        return out

    def save_student(self, student: GuidanceAdaptedUNet, out_dir) -> None:
        super().save_student(student.base, out_dir)
        student.save_adapters(out_dir / "guidance_adapter")
