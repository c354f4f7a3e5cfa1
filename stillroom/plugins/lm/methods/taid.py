"""TAID: Temporally Adaptive Interpolated Distillation (Shing et al. 2025, "TAID: Temporally Adaptive
Interpolated Distillation for Efficient Knowledge Transfer in Language Models", ICLR 2025).

The student is not asked to match the teacher at once: its target moves from (a detached copy of)
itself to the teacher as the interpolation parameter t grows,

    p_t = softmax((1 - t) * sg(z_student) + t * z_teacher),     L = KL(p_t || q_student)   (eq. 3-4)

and t follows the adaptive schedule of the paper's Algorithm 1: with the relative loss change
delta_n = (L_{n-1} - L_n) / L_{n-1} and its momentum m_n = beta * m_{n-1} + (1 - beta) * delta_n,

    t_n = min(t_end, max(t_linear(n), t_{n-1} + alpha * sigmoid(m_n) * (1 - t_{n-1}))),
    t_linear(n) = t_start + (t_end - t_start) * n / N.

t therefore never falls below the linear ramp and moves faster while the loss keeps falling. t, m and
the previous loss are saved in checkpoints (``state_dict``) so a resumed run continues the schedule.
``kd_ratio`` < 1 mixes in next-token cross-entropy.
"""

from __future__ import annotations

import math

from pydantic import Field

from stillroom.core.method import Params, StepOutput
from stillroom.plugins.lm import losses
from stillroom.plugins.lm.base import LMMethod


class TAIDParams(Params):
    t_start: float = Field(0.4, ge=0, le=1)
    t_end: float = Field(1.0, ge=0, le=1)
    alpha: float = Field(5e-4, ge=0, description="step size of the adaptive update")
    beta: float = Field(0.99, ge=0, lt=1, description="momentum of the relative loss change")
    kd_ratio: float = Field(1.0, ge=0, le=1, description="weight of the TAID term; 1 - kd_ratio weights CE")


class TAID(LMMethod):
    name = "taid"
    description = "TAID: KL to a target interpolated from the student to the teacher, adaptive t"
    paper = "Shing et al. 2025, TAID: Temporally Adaptive Interpolated Distillation (ICLR 2025)"
    Params = TAIDParams

    def __init__(self, recipe, ctx) -> None:
        super().__init__(recipe, ctx)
        self.t = float(self.params.t_start)
        self.momentum = 0.0
        self.prev_loss: float | None = None

    def loss(self, role: str, batch, step: int) -> StepOutput:
        p = self.params
        logits = self.student(**self.model_inputs(batch)).logits
        student, teacher = self.targets(batch, logits, 1.0)
        taid = losses.taid_loss(student, teacher, self.t, self.loss_mask(batch))
        metrics = {"taid": taid.item(), "taid_t": self.t}
        total = taid
        if p.kd_ratio < 1:
            ce = self.cross_entropy(logits, batch)
            total = p.kd_ratio * taid + (1 - p.kd_ratio) * ce
            metrics["ce"] = ce.item()
        return StepOutput(total, metrics)

    def after_step(self, step: int, metrics: dict[str, float]) -> None:
        self.update_t(metrics["taid"], step + 1, self.recipe.train.steps)

    def update_t(self, loss: float, step: int, total_steps: int) -> float:
        """Algorithm 1's update of t after optimizer step ``step`` (1-based) of ``total_steps``."""
        p = self.params
        linear = p.t_start + (p.t_end - p.t_start) * step / total_steps
        adaptive = self.t
        if self.prev_loss is not None:
            relative = (self.prev_loss - loss) / (self.prev_loss + 1e-15)
            self.momentum = p.beta * self.momentum + (1 - p.beta) * relative
            adaptive = self.t + p.alpha * _sigmoid(self.momentum) * (1 - self.t)
        self.t = min(p.t_end, max(linear, adaptive))
        self.prev_loss = loss
        return self.t

    def state_dict(self) -> dict:
        return {"t": self.t, "momentum": self.momentum, "prev_loss": self.prev_loss}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.t, self.momentum, self.prev_loss = state["t"], state["momentum"], state["prev_loss"]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))
