"""Logit distillation for causal LMs (Hinton et al. 2015, "Distilling the Knowledge in a Neural
Network"), with the divergence as a choice:

    L = kd_ratio * D(p_teacher,T, q_student,T) + (1 - kd_ratio) * CE(y, q_student)

    D = fkl  T^2 KL(p || q)                             Hinton et al. 2015
        rkl  T^2 KL(q || p)                             MiniLLM, Gu et al. 2024
        jsd  generalized JSD(beta)                      GKD, Agarwal et al. 2024
        sfkl KL(p || alpha p + (1-alpha) q)             DistiLLM, Ko et al. 2024
        srkl KL(q || (1-alpha) p + alpha q)             DistiLLM, Ko et al. 2024
        tvd  1/2 sum |p - q|                            Wen et al. 2023

The first term transfers the teacher's whole next-token distribution ("dark knowledge"), the second
keeps the student on the data. ``kd_ratio = 0`` is plain next-token training (the baseline).

``1 - kd_ratio`` is the ground-truth weight xi of Borup & Andersen 2021 ("Even your Teacher Needs
Guidance: Ground-Truth Targets Dampen Regularization Imposed by Self-Distillation"): in repeated
self-distillation (a teacher of the student's own architecture; round k's student teaches round
k + 1, chained as runs with ``teacher.path=ROUND_K/student``) xi = 0 keeps amplifying the
regularisation round after round, xi > 0 damps it. ``benchmarks/self_distill_rounds.py`` measures it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from stillroom.core.method import Params, StepOutput
from stillroom.plugins.lm import losses
from stillroom.plugins.lm.base import LMMethod


class KDParams(Params):
    divergence: Literal["fkl", "rkl", "jsd", "sfkl", "srkl", "tvd"] = "fkl"
    temperature: float = Field(1.0, gt=0)
    kd_ratio: float = Field(1.0, ge=0, le=1, description="weight of the KD term; 1 - kd_ratio weights CE")
    beta: float = Field(0.5, ge=0, le=1, description="jsd: mixture weight of the teacher")
    alpha: float = Field(0.1, ge=0, lt=1, description="sfkl/srkl: skew")


class KD(LMMethod):
    name = "kd"
    description = "logit distillation (fkl, rkl, jsd, sfkl, srkl, tvd) mixed with CE by kd_ratio"
    paper = "Hinton et al. 2015, Distilling the Knowledge in a Neural Network"
    Params = KDParams

    def kd_term(self, batch, logits):
        """The divergence between teacher and student on the counted positions."""
        p = self.params
        student, teacher = self.targets(batch, logits, p.temperature)
        return losses.divergence(
            p.divergence, student, teacher, self.loss_mask(batch), p.temperature, beta=p.beta, alpha=p.alpha
        )

    def loss(self, role: str, batch, step: int) -> StepOutput:
        p = self.params
        logits = self.student(**self.model_inputs(batch)).logits
        ce = self.cross_entropy(logits, batch)
        if p.kd_ratio == 0:
            return StepOutput(ce, {"ce": ce.item()})
        kd = self.kd_term(batch, logits)
        total = p.kd_ratio * kd + (1 - p.kd_ratio) * ce
        return StepOutput(total, {"kd": kd.item(), "ce": ce.item()})
