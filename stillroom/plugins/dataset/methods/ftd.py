"""Flat Trajectory Distillation (Du, Jiang, Tan, Zhou, Li 2023, "Minimizing the Accumulated Trajectory
Error to Improve Dataset Distillation"): MTT whose experts are trained to be flat, and whose output is
an exponential moving average of the synthetic images.

MTT matches the student to the expert segment by segment, but a student trained on D_syn drifts from
the expert trajectory and the error accumulates over the segments. FTD bounds the accumulated error by
training experts in flat regions of the loss, with sharpness-aware minimisation (SAM; the paper's
eq. 7 regulariser min_theta max_{||eps|| <= rho} L(theta + eps), first-order):

    g = grad_theta L(theta),   eps = rho * g / ||g||,   theta <- theta - lr * grad_theta L(theta + eps)

(``experts.sam_rho``; the experts' cache key includes rho). The matching objective is MTT's eq. 2
unchanged,

    L = ||theta_hat_{t+N} - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2,

and the distilled set is the Polyak average of D_syn over the outer steps k (``ema_decay`` = beta),

    D_ema^0 = D_syn^0,   D_ema^{k+1} = beta * D_ema^k + (1 - beta) * D_syn^{k+1},

held as a buffer of the ``student`` role so it is checkpointed and resumes bitwise.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from stillroom.plugins.dataset.experts import ExpertConfig
from stillroom.plugins.dataset.methods.mtt import MTT, MTTParams, SyntheticSet


class FTDParams(MTTParams):
    ema_decay: float = Field(0.9, ge=0, lt=1, description="beta of the EMA of the synthetic images")
    experts: ExpertConfig = Field(default_factory=lambda: ExpertConfig(sam_rho=0.05))


class AveragedSyntheticSet(SyntheticSet):
    """D_syn and, as a buffer, its exponential moving average D_ema."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, syn_lr: float, lr_scale: float) -> None:
        super().__init__(images, labels, syn_lr, lr_scale)
        self.register_buffer("ema", images.clone())

    @torch.no_grad()
    def average(self, decay: float) -> None:
        self.ema.lerp_(self.images, 1.0 - decay)


class FTD(MTT):
    name = "ftd"
    description = "trajectory matching on flat (SAM-trained) experts; the output is an EMA of the images"
    paper = "Du et al. 2023, Minimizing the Accumulated Trajectory Error to Improve Dataset Distillation"
    Params = FTDParams
    Synthetic = AveragedSyntheticSet

    def after_step(self, step: int, metrics: dict[str, float]) -> None:
        super().after_step(step, metrics)  # D_syn^{k+1} projected onto [0, 1] first
        self.synthetic.average(self.params.ema_decay)

    def distilled(self) -> tuple[np.ndarray, np.ndarray]:
        _, labels = super().distilled()
        return self.synthetic.ema.clamp(0, 1).cpu().numpy().astype(np.float32), labels
