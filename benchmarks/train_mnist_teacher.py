"""Train the embedded class-conditional MNIST DDPM teacher (``stillroom/data/mnist_teacher``).

Why: diffusion-distillation methods need a real diffusion teacher, and no model hub is reachable.
This trains a small diffusers ``UNet2DModel`` (epsilon prediction, 1000-step cosine DDPM schedule)
on the shipped 4000-image MNIST train split in a CPU budget of ~15 minutes, then measures its
quality with DDIM at 50/25/10 steps and classifier-free guidance (CFG), and writes

    OUT/unet/                 UNet2DModel.save_pretrained (safetensors; EMA weights)
    OUT/scheduler/            DDPMScheduler.save_pretrained (DDIMScheduler.from_config works on it)
    OUT/samples.png           10x10 grid, one row per class, 50 DDIM steps with CFG
    OUT/training.json         machine-readable record: config, steps, wall time, quality table
    OUT/TRAINING.md           the same for humans

Design choices, and why:
- Class conditioning through ``num_class_embeds=11``: labels 0-9 are digits, label 10 is the
  "null" class. Training replaces the label by 10 with probability ``--label-dropout`` so the same
  network gives the unconditional prediction, which CFG needs (Ho & Salimans 2022):
  eps = eps(x, null) + w * (eps(x, y) - eps(x, null)); w = 1 is plain conditional sampling.
- Cosine ("squaredcos_cap_v2") betas: at 28x28 the linear schedule wastes its last few hundred
  steps on pure noise (Nichol & Dhariwal 2021). ``timestep_spacing="trailing"`` makes few-step
  DDIM start at t=999 (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are
  Flawed"), which matters for the 10-step and distilled samplers.
- Budget by time, EMA, the UNet and the quality table: see ``mnist_teacher_common.py`` (shared
  with ``train_mnist_flow_teacher.py``).
- Guidance: the recommended w is the first ``--cfg`` value (1.25). In a 15-minute budget the
  null-class branch sees only ~12% of the samples, and larger w (2.0) amplifies its errors along
  many-step DDIM trajectories (fine at 10 steps, worse at 50); TRAINING.md shows both.
- EMA of the weights (decay warmed up as min(d, (1+n)/(10+n))) is what gets saved: with a short run
  EMA samples are visibly cleaner than the raw weights.

    python benchmarks/train_mnist_teacher.py --minutes 15 --threads 1
    python benchmarks/train_mnist_teacher.py --eval-only          # re-measure an existing teacher
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mnist_teacher_common import run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "stillroom" / "data" / "mnist_teacher"


def scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="epsilon",
        timestep_spacing="trailing",
        clip_sample=True,
        clip_sample_range=1.0,
    )


_ABAR = scheduler().alphas_cumprod.float()


def epsilon_loss(unet, x0: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """|| eps_theta(x_t, t, y) - eps ||^2 on x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t ~ U{0..999}."""
    t = torch.randint(0, len(_ABAR), (len(y),), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    a = _ABAR[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    return F.mse_loss(unet(xt, t, class_labels=y).sample, noise)


if __name__ == "__main__":
    run(
        __doc__,
        "train_mnist_teacher.py",
        DEFAULT_OUT,
        [1.25, 2.0],
        epsilon_loss,
        scheduler,
        "DDIMScheduler",
        {
            "title": "class-conditional DDPM",
            "scheduler_name": "DDPMScheduler",
            "sampler_name": "DDIM",
            "objective": "epsilon: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with t ~ U{0..999}, the UNet "
            "is regressed onto eps (MSE)",
            "sampling": "DDIM (eta 0, `DDIMScheduler.from_config` of the saved scheduler, "
            "trailing timesteps), "
            "classifier-free guidance (eps = eps_null + w (eps_y - eps_null))",
        },
    )
