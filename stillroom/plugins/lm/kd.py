"""Logit distillation for causal LMs (Hinton et al. 2015, "Distilling the Knowledge in a Neural
Network").

    L = kd_ratio * T^2 * KL(p_teacher,T || q_student,T) + (1 - kd_ratio) * CE(y, q_student)

The first term transfers the teacher's whole next-token distribution ("dark knowledge"), the second
keeps the student on the data.
"""

from __future__ import annotations

from pydantic import Field

from stillroom.core.method import Params, StepOutput
from stillroom.plugins.lm import losses
from stillroom.plugins.lm.base import LMMethod


class KDParams(Params):
    temperature: float = Field(1.0, gt=0)
    kd_ratio: float = Field(1.0, ge=0, le=1, description="weight of the KD term; 1 - kd_ratio weights CE")


class KD(LMMethod):
    name = "kd"
    description = "logit distillation: forward KL to the teacher's softened distribution + CE"
    paper = "Hinton et al. 2015, Distilling the Knowledge in a Neural Network"
    Params = KDParams

    def loss(self, role: str, batch, step: int) -> StepOutput:
        p = self.params
        logits = self.student(**batch).logits
        kd = losses.forward_kl(logits, self.teacher_logits(batch), batch["attention_mask"], p.temperature)
        ce = self.cross_entropy(logits, batch)
        total = p.kd_ratio * kd + (1 - p.kd_ratio) * ce
        return StepOutput(total, {"kd": kd.item(), "ce": ce.item()})
