"""Logit matching (Ba & Caruana 2014, "Do Deep Nets Really Need to be Deep?").

The student regresses the teacher's logits directly, after removing each position's mean (logits
are defined up to an additive constant per position, so only centred logits are comparable):

    L = 1/(N V) * sum_n sum_v ( (z_s[n,v] - mean_v z_s[n]) - (z_t[n,v] - mean_v z_t[n]) )^2
"""

from __future__ import annotations

from pydantic import Field

from stillroom import LMMethod, Params, StepOutput


class LogitMSEParams(Params):
    ce_weight: float = Field(0.0, ge=0, description="weight of next-token cross-entropy added to the MSE")


class LogitMSE(LMMethod):
    name = "logit-mse"
    description = "squared error between centred student and teacher logits"
    paper = "Ba & Caruana 2014, Do Deep Nets Really Need to be Deep?"
    Params = LogitMSEParams

    def loss(self, role, batch, step) -> StepOutput:
        student = self.student(**batch).logits.float()
        teacher = self.teacher_logits(batch).float()
        diff = (student - student.mean(-1, keepdim=True)) - (teacher - teacher.mean(-1, keepdim=True))
        mask = batch["attention_mask"].unsqueeze(-1).to(diff.dtype)
        mse = (diff.pow(2) * mask).sum() / (mask.sum() * diff.shape[-1])
        ce = self.cross_entropy(student, batch)
        return StepOutput(mse + self.params.ce_weight * ce, {"mse": mse.item(), "ce": ce.item()})
