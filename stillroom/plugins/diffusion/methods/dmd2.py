"""Improved Distribution Matching Distillation (Yin et al. 2024, "Improved Distribution Matching
Distillation for Fast Image Synthesis", DMD2; DMD: Yin et al. 2024, "One-step Diffusion with
Distribution Matching Distillation").

Generator update (DMD eq. 7-8). For a generator sample x = G(z), t ~ U[t_min, t_max], x_t = alpha_t x +
sigma_t eps, the real (teacher with CFG) and fake (critic) denoised predictions give

    grad = (x_hat_fake(x_t, t) - x_hat_real(x_t, t)) / mean_{c,h,w} |x - x_hat_real(x_t, t)|

(per-sample normalisation), and the loss 0.5 ||x - sg(x - grad)||^2 has dL/dx = grad, so a descent
step moves x toward the teacher's distribution (away from the critic's model of the student's own).
Critic update: the standard denoising loss on detached generator samples, ||eps_fake(x_t, t) - eps||^2,
on the critic's raw prediction (the teacher's x0 clamp, right for sampling, would zero the gradient
of every clamped pixel: about 16% of them on the embedded MNIST teacher) and at t ~ U{0, ..., T-1},
the full range, as DMD2's training code draws the fake score's timesteps. The generator's t stays in
[t_min, t_max] (DMD2: 0.02T to 0.98T), where the teacher's score is informative.
Two-time-scale rule: the critic steps ``critic_updates`` times per generator step (``phases``).
Optional GAN (DMD2 sec. 4.2): a small head D on the critic's UNet mid-block features, non-saturating
losses  L_D = softplus(-D(x_t^real)) + softplus(D(x_t^fake)) for the critic and L_G = softplus(-D(x_t^fake))
for the generator. Backward simulation (DMD2 sec. 4.4): a K-step student trains on the states its own
first k steps produce (``DiffusionMethod.student_sample``).
"""

from __future__ import annotations

import copy

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from stillroom.core.method import Phase, Role, StepOutput
from stillroom.plugins.diffusion.base import DiffusionMethod, DiffusionParams, score_distillation_loss


class DMD2Params(DiffusionParams):
    critic_updates: int = Field(5, ge=1, description="critic steps per generator step (two-time-scale)")
    critic_lr: float | None = Field(None, gt=0, description="critic learning rate (default: train.lr)")
    t_min: float = Field(0.02, ge=0, lt=1, description="fraction of T")
    t_max: float = Field(0.98, gt=0, le=1)
    gan_weight: float = Field(0.0, ge=0, description="weight of the generator's GAN loss (0: no GAN head)")
    gan_critic_weight: float = Field(1.0, ge=0)


def dmd_gradient(x: torch.Tensor, x_real: torch.Tensor, x_fake: torch.Tensor) -> torch.Tensor:
    """(x_fake - x_real) / mean |x - x_real| per sample (DMD eq. 8 with DMD's normalisation)."""
    weight = (x - x_real).abs().mean(dim=tuple(range(1, x.dim())), keepdim=True)
    return (x_fake - x_real) / weight.clamp(min=1e-8)


class MidFeatures:
    """Captures the UNet mid-block output (the critic's bottleneck) during a forward pass."""

    def __init__(self, unet: nn.Module) -> None:
        self.value: torch.Tensor | None = None
        unet.mid_block.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.value = output[0] if isinstance(output, tuple) else output


class GanHead(nn.Module):
    """D: conv -> SiLU -> global average pool -> linear logit, on bottleneck features."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.out = nn.Linear(channels, 1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.out(F.silu(self.conv(feats)).mean(dim=(2, 3))).squeeze(1)


class DMD2(DiffusionMethod):
    name = "dmd2"
    description = "distribution matching distillation with a fake-score critic, two-time-scale, GAN head"
    paper = "Yin et al. 2024, Improved Distribution Matching Distillation for Fast Image Synthesis"
    Params = DMD2Params

    @property
    def needs_images(self) -> bool:  # real images only feed the GAN head
        return self.params.gan_weight > 0

    def extra_roles(self):
        self.critic = copy.deepcopy(self.teacher.unet).train().requires_grad_(True)
        self.features = MidFeatures(self.critic)
        self.gan = GanHead(self.critic.config.block_out_channels[-1]) if self.params.gan_weight > 0 else None
        return {"critic": Role(self.critic, lr=self.params.critic_lr, aux=self.gan)}

    def phases(self, step):
        return [Phase("critic", repeats=self.params.critic_updates), Phase("student")]

    def random_t(self, b, dev):
        """The generator's t ~ U{t_min T, ..., t_max T}."""
        lo, hi = int(self.params.t_min * self.T), int(self.params.t_max * self.T)
        return torch.randint(lo, max(hi, lo + 1), (b,), device=dev)

    def critic_t(self, b, dev):
        """The critic's t ~ U{0, ..., top} (T - 1 on VP, T on flow): it must model the student's
        distribution at every noise level."""
        return torch.randint(0, self.top + 1, (b,), device=dev)

    def loss(self, role, batch, step) -> StepOutput:
        return self.critic_loss(batch) if role == "critic" else self.generator_loss(batch)

    def critic_loss(self, batch) -> StepOutput:
        with torch.no_grad():
            x, _ = self.student_sample(batch)
        t = self.critic_t(x.shape[0], x.device)
        eps = torch.randn_like(x)
        x_t = self.add_noise(x, t, eps)
        _, eps_fake = self.x0_eps(self.critic, x_t, t, batch["cond"], clip=False)
        loss = F.mse_loss(eps_fake.float(), eps.float())
        metrics = {"critic_denoise": loss.item()}
        if self.gan is not None and batch["x0"] is not None:
            fake_logit = self.gan(self.features.value)
            real_t = self.add_noise(batch["x0"], t, torch.randn_like(batch["x0"]))
            self.critic(real_t, t, **{k: v for k, v in batch["cond"].items() if v is not None})
            real_logit = self.gan(self.features.value)
            d_loss = F.softplus(-real_logit).mean() + F.softplus(fake_logit).mean()
            loss = loss + self.params.gan_critic_weight * d_loss
            metrics["gan_d"] = d_loss.item()
        return StepOutput(loss, metrics)

    def generator_loss(self, batch) -> StepOutput:
        x, k = self.student_sample(batch)
        t = self.random_t(x.shape[0], x.device)
        x_t = self.add_noise(x, t, torch.randn_like(x))
        with torch.no_grad():
            x_real, _ = self.x0_eps(
                self.teacher.unet, x_t, t, batch["cond"], batch["uncond"], self.recipe.teacher.guidance
            )
            x_fake, _ = self.x0_eps(self.critic, x_t, t, batch["cond"])
            grad = dmd_gradient(x, x_real, x_fake)
        loss = score_distillation_loss(x, grad)
        metrics = {
            "dm": loss.item(),
            "dm_grad_norm": grad.norm().item() / x.shape[0] ** 0.5,
            "sim_step": float(k),
        }
        if self.gan is not None:
            self.critic(x_t, t, **{k_: v for k_, v in batch["cond"].items() if v is not None})
            g_loss = F.softplus(-self.gan(self.features.value)).mean()
            loss = loss + self.params.gan_weight * g_loss
            metrics["gan_g"] = g_loss.item()
        return StepOutput(loss, metrics)
