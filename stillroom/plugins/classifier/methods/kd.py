"""Soft-target distillation of a classifier (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge
in a Neural Network"):

    L = alpha * T^2 KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(y, softmax(z_s))

z_t are the teacher's logits and z_s the student's. The first term transfers the
teacher's whole distribution over classes at temperature T ("dark knowledge": which wrong classes
an image resembles); T^2 keeps its gradient's scale independent of T (Hinton et al., section 2).
The second keeps the student on the labels. ``alpha = 0`` is plain cross-entropy training, the
baseline (the teacher is then not run at all). A student whose head has K outputs per class (LELP,
which subclasses this method) distils those outputs towards targets of the same width and takes its
CE on the class probabilities, the sums over each class's outputs.

Registered as ``classifier_kd``: method names are global and ``kd`` is the causal-LM family's.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch.nn import functional as F

from stillroom.core.method import Params, StepOutput
from stillroom.plugins.classifier.base import ClassifierMethod
from stillroom.plugins.classifier.models import class_logits


class KDParams(Params):
    temperature: float = Field(4.0, gt=0, description="T: softens both distributions in the KD term")
    alpha: float = Field(0.9, ge=0, le=1, description="weight of the KD term; 1 - alpha weights CE")


def soft_target_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch."""
    log_p = F.log_softmax(teacher.float() / temperature, dim=-1)
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    return temperature**2 * (log_p.exp() * (log_p - log_q)).sum(-1).mean()


class ClassifierKD(ClassifierMethod):
    name = "classifier_kd"
    description = "soft-target KD of a classifier (T^2 KL at temperature T) mixed with CE by alpha"
    paper = "Hinton et al. 2015, Distilling the Knowledge in a Neural Network"
    Params = KDParams

    @property
    def needs_teacher(self) -> bool:
        return self.params.alpha > 0

    def loss(self, role: str, batch, step: int) -> StepOutput:
        p = self.params
        outputs = self.student.subclass_logits(batch["images"])
        ce = F.cross_entropy(class_logits(outputs, self.subclasses()).float(), batch["labels"])
        if p.alpha == 0:
            return StepOutput(ce, {"ce": ce.item()})
        kd = soft_target_kl(outputs, batch["targets"], p.temperature)
        return StepOutput(p.alpha * kd + (1 - p.alpha) * ce, {"kd": kd.item(), "ce": ce.item()})
