"""Variational score distillation for one-step generators: SwiftBrush (Nguyen & Tran 2024,
"SwiftBrush: One-Step Text-to-Image Diffusion Model with Variational Score Distillation") with
SNOOPI's random-scale guidance (Nguyen et al. 2024, "SNOOPI: Supercharged One-step Diffusion
Distillation with Proper Guidance").

The student G maps noise z to x = G(z) in one step (at t = T - 1). A critic eps_phi (LoRA on the teacher,
or a full copy) learns the score of the student's distribution with the denoising loss on detached
samples, ||eps_phi(x_t, t, y) - eps||^2 (labels dropped to the null input with probability ``p_uncond``
so the critic supports CFG). The student's gradient (SwiftBrush eq. 5, VSD of ProlificDreamer):

    grad_theta = E_{t, eps}[ w(t) (eps_teacher^w(x_t, t, y) - eps_phi^w(x_t, t, y)) dx/dtheta ],

implemented as the loss 0.5 ||x - sg(x - w(t) g)||^2 with g the score difference, w(t) = 1.
SNOOPI: at every step one scale w ~ U[guidance_min, guidance_max] is drawn and used for both the
teacher and the critic (each with CFG), which stabilises VSD across teachers.
"""

from __future__ import annotations

import copy
import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from stillroom.core.errors import StillroomError
from stillroom.core.method import Phase, Role, StepOutput
from stillroom.plugins.diffusion import models as dm
from stillroom.plugins.diffusion.base import DiffusionMethod, DiffusionParams, score_distillation_loss


class VSDParams(DiffusionParams):
    critic: Literal["lora", "copy"] = "lora"
    lora_rank: int = Field(8, gt=0)
    critic_lr: float | None = Field(None, gt=0)
    guidance_min: float = Field(2.0, ge=1, description="SNOOPI: lower end of the random guidance scale")
    guidance_max: float = Field(4.0, ge=1, description="SNOOPI: upper end (= min for a fixed scale)")
    p_uncond: float = Field(0.1, ge=0, le=1, description="critic label dropout (learns the unconditional)")
    t_min: float = Field(0.02, ge=0, lt=1)
    t_max: float = Field(0.98, gt=0, le=1)


class LoRALinear(nn.Module):
    """y = W x + (alpha / r) B A x with A ~ Kaiming, B = 0 (Hu et al. 2021, "LoRA")."""

    def __init__(self, base: nn.Linear, rank: int) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


class LoRAConv(nn.Module):
    """LoRA for a Conv2d: a rank-r conv with the base kernel, then a 1x1 up-projection (zero-init)."""

    def __init__(self, base: nn.Conv2d, rank: int) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
        self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


def add_lora(model: nn.Module, rank: int) -> nn.Module:
    """Freezes ``model`` and wraps its Linear/Conv2d layers (groups == 1) with trainable LoRA adapters."""
    model.requires_grad_(False)
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)
    ]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapped = LoRALinear(module, rank) if isinstance(module, nn.Linear) else LoRAConv(module, rank)
        setattr(parent, child, wrapped.to(module.weight.device))
    return model


class VSD(DiffusionMethod):
    name = "vsd"
    description = "one-step variational score distillation (SwiftBrush) with SNOOPI random-scale guidance"
    paper = "Nguyen & Tran 2024, SwiftBrush; Nguyen et al. 2024, SNOOPI"
    Params = VSDParams
    needs_images = False

    def extra_roles(self):
        p = self.params
        if p.guidance_max < p.guidance_min:
            raise StillroomError("method.guidance_max is below method.guidance_min", "swap them")
        if self.recipe.student.steps != 1:
            raise StillroomError("vsd trains one-step generators", "set student.steps=1 (or use dmd2)")
        critic = copy.deepcopy(self.teacher.unet)
        self.critic = add_lora(critic, p.lora_rank) if p.critic == "lora" else critic.requires_grad_(True)
        self.scales: list[float] = []
        return {"critic": Role(self.critic, lr=p.critic_lr)}

    def phases(self, step):
        return [Phase("critic"), Phase("student")]

    def draw_scale(self) -> float:
        """SNOOPI: w ~ U[guidance_min, guidance_max], one draw per training step."""
        p = self.params
        w = p.guidance_min + (p.guidance_max - p.guidance_min) * float(torch.rand(()))
        self.scales.append(w)
        return w

    def random_t(self, b, dev):
        lo, hi = int(self.params.t_min * self.T), int(self.params.t_max * self.T)
        return torch.randint(lo, max(hi, lo + 1), (b,), device=dev)

    def loss(self, role, batch, step) -> StepOutput:
        return self.critic_loss(batch) if role == "critic" else self.student_loss(batch)

    def critic_loss(self, batch) -> StepOutput:
        with torch.no_grad():
            x, _ = self.student_sample(batch, 0)
        t = self.random_t(x.shape[0], x.device)
        eps = torch.randn_like(x)
        x_t = self.add_noise(x, t, eps)
        drop = torch.rand(x.shape[0], device=x.device) < self.params.p_uncond
        cond = {}
        for key, value in batch["cond"].items():
            if value is None:
                continue
            mask = drop.view(-1, *([1] * (value.dim() - 1)))
            cond[key] = torch.where(mask, batch["uncond"][key], value)
        eps_phi = self.critic(x_t, t, **cond).sample
        a, s = self.coeffs(t)
        if self.teacher.prediction != "epsilon":
            from stillroom.plugins.diffusion.sampler import to_x0_eps

            _, eps_phi = to_x0_eps(eps_phi, x_t, a, s, self.teacher.prediction)
        loss = F.mse_loss(eps_phi.float(), eps.float())
        return StepOutput(loss, {"critic_denoise": loss.item()})

    def student_loss(self, batch) -> StepOutput:
        x, _ = self.student_sample(batch, 0)
        w = self.draw_scale()
        t = self.random_t(x.shape[0], x.device)
        x_t = self.add_noise(x, t, torch.randn_like(x))
        with torch.no_grad():
            _, eps_teacher = self._eps(self.teacher.unet, x_t, t, batch, w)
            _, eps_critic = self._eps(self.critic, x_t, t, batch, w)
            grad = eps_teacher - eps_critic
        loss = score_distillation_loss(x, grad)
        return StepOutput(loss, {"vsd": loss.item(), "guidance_scale": w})

    def _eps(self, unet, x_t, t, batch, w):
        out = dm.cfg_output(unet, x_t, t, batch["cond"], batch["uncond"], w)
        a, s = self.coeffs(t)
        from stillroom.plugins.diffusion.sampler import to_x0_eps

        return to_x0_eps(out, x_t, a, s, self.teacher.prediction)
