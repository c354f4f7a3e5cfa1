"""Train the embedded class-conditional MNIST flow-matching teacher (``stillroom/data/mnist_flow_teacher``).

Why: flow-map and few-step flow distillation methods need a velocity (rectified-flow) teacher, and no
model hub is reachable. Same UNet, data, label/null-class convention and budget as the DDPM teacher
(``train_mnist_teacher.py``; both scripts share ``mnist_teacher_common.py``); only the objective and
the scheduler differ.

Convention (rectified flow, Liu et al. 2023; the one diffusers' ``FlowMatchEulerDiscreteScheduler``
and SD3 use): with t in [0, 1], noise eps ~ N(0, I) and data x0,

    x_t = (1 - t) x0 + t eps,        v(x_t, t, y) = dx_t/dt = eps - x0,

and the UNet receives the timestep 1000 t (the scheduler's ``timesteps = sigmas * 1000``). Training
minimises || v_theta(x_t, 1000 t, y) - (eps - x0) ||^2 with t ~ U(0, 1) and the label replaced by the
null class 10 with probability ``--label-dropout``. Sampling integrates dx/dt = v from t = 1 (noise) to
t = 0 with Euler steps (``FlowMatchEulerDiscreteScheduler.step``: x <- x + (t_next - t) v) and
classifier-free guidance v = v(x, null) + w (v(x, y) - v(x, null)).

    OUT/unet/                 UNet2DModel.save_pretrained (safetensors; EMA weights)
    OUT/scheduler/            FlowMatchEulerDiscreteScheduler.save_pretrained (shift 1)
    OUT/samples.png           10x10 grid, one row per class, 50 Euler steps with CFG
    OUT/training.json         machine-readable record: config, steps, wall time, quality table
    OUT/TRAINING.md           the same for humans

    python benchmarks/train_mnist_flow_teacher.py --minutes 15 --threads 1
    python benchmarks/train_mnist_flow_teacher.py --eval-only      # re-measure an existing teacher
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mnist_teacher_common import run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "stillroom" / "data" / "mnist_flow_teacher"
T_SCALE = 1000  # the UNet's timestep input is 1000 t


def scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=T_SCALE, shift=1.0)


def velocity_loss(unet, x0: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """|| v_theta(x_t, 1000 t, y) - (eps - x0) ||^2 on x_t = (1 - t) x0 + t eps, t ~ U(0, 1)."""
    t = torch.rand(len(y), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    tb = t.view(-1, 1, 1, 1)
    xt = (1 - tb) * x0 + tb * eps
    return F.mse_loss(unet(xt, t * T_SCALE, class_labels=y).sample, eps - x0)


if __name__ == "__main__":
    run(
        __doc__,
        "train_mnist_flow_teacher.py",
        DEFAULT_OUT,
        [1.5, 2.0],
        velocity_loss,
        scheduler,
        "FlowMatchEulerDiscreteScheduler",
        {
            "title": "class-conditional rectified flow (velocity prediction)",
            "scheduler_name": "FlowMatchEulerDiscreteScheduler",
            "sampler_name": "Euler",
            "objective": "velocity (rectified flow): x_t = (1 - t) x0 + t eps with t ~ U(0, 1), the "
            "UNet takes the timestep 1000 t and is regressed onto v = eps - x0 (MSE)",
            "sampling": "Euler steps of dx/dt = v from t = 1 to 0 "
            "(`FlowMatchEulerDiscreteScheduler.from_config` of the saved scheduler), "
            "classifier-free guidance (v = v_null + w (v_y - v_null))",
        },
    )
