"""Self-distillation for further pre-training (Lee et al. 2023, "Self-Distillation for Further
Pre-training of Transformers", ICLR 2023), with ground-truth guidance (Borup & Andersen 2021, "Even
your Teacher Needs Guidance: Ground-Truth Targets Dampen Regularization Imposed by Self-Distillation").

Adapting a pre-trained model theta_0 to a new domain D^u by simply continuing its training (further
pre-training) overfits D^u. The paper's remedy, for a causal LM whose self-supervised loss is
next-token cross-entropy:

1. further pre-training: theta_1 = argmin_theta CE(theta; D^u), started from theta_0 (the teacher);
2. self-distillation: the student starts again from theta_0 and is trained on D^u with

       L(theta) = CE(theta; D^u) + lambda * 1/n sum_i ||h_theta(x_i) - sg(h_theta_1(x_i))||^2,

   h the last hidden state (the representation the LM head reads) and sg the stop-gradient.

With the ground-truth weight xi of Borup & Andersen the two terms are mixed convexly, as ``kd`` mixes
its divergence with CE (``kd_ratio`` = 1 - xi; the paper's loss is kd_ratio = 1/2 up to a factor 2):

    L = kd_ratio * hidden_weight * d(h_student, h_teacher) + (1 - kd_ratio) * CE(y, q_student),

d is ``hidden``'s representation distance (``hidden_loss``: mse = 1/D ||.||^2, so hidden_weight =
D * lambda; cosine; mi_alpha) at hidden-state index ``layer`` (-1: the last).

Stage 1 is a phase of this method (``further_steps`` > 0): for those first steps only the teacher
role's optimizer steps, on CE; from then on only the student's, the teacher frozen. Both read the same
``data`` (the new domain) and the one ``train`` schedule (use ``schedule: constant``, or the student
gets the tail of a decay). Multi-round self-distillation (the student of round k is the teacher of
round k + 1, every student restarting from theta_0) chains runs: round k + 1 is this recipe with
``teacher.path=ROUND_K/student method.further_steps=0`` and ``student.path`` theta_0; a fresh optimizer
and schedule per round is what a fresh run gives (``benchmarks/self_distill_rounds.py``).
"""

from __future__ import annotations

import torch
from pydantic import Field

from stillroom.core.errors import StillroomError
from stillroom.core.method import Phase, Role, StepOutput
from stillroom.plugins.lm.base import LMMethod
from stillroom.plugins.lm.methods.hidden import HiddenObjective, features, hidden_distance


class SelfDistillParams(HiddenObjective):
    further_steps: int = Field(
        0, ge=0, description="stage 1: steps further pre-training the teacher (0: teacher.path is theta_1)"
    )
    layer: int = Field(-1, description="hidden-state index matched (-1: the last, what the head reads)")
    hidden_weight: float = Field(1.0, ge=0, description="lambda (times D for mse)")
    kd_ratio: float = Field(
        0.5, ge=0, le=1, description="weight of the distillation term; 1 - kd_ratio (xi) weights CE"
    )


class SelfDistill(LMMethod):
    name = "self_distill"
    description = "further pre-train a copy on the new domain, then self-distil its hidden states + CE"
    paper = "Lee et al. 2023, Self-Distillation for Further Pre-training of Transformers (ICLR 2023)"
    Params = SelfDistillParams
    needs_live_teacher = True

    def build(self) -> dict[str, Role]:
        further, steps = self.params.further_steps, self.recipe.train.steps
        if further >= steps:
            raise StillroomError(
                f"method.further_steps={further} leaves none of train.steps={steps} for the student",
                "make further_steps smaller than train.steps",
            )
        roles = super().build()
        if further > 0:
            roles["teacher"] = Role(self.teacher)  # trainable: stage 1 steps its optimizer
        return roles

    def phases(self, step: int) -> list[Phase]:
        return [Phase("teacher" if step < self.params.further_steps else "student")]

    def loss(self, role: str, batch, step: int) -> StepOutput:
        p = self.params
        self.teacher.train(role == "teacher")
        inputs = self.model_inputs(batch)
        if role == "teacher":
            ce = self.cross_entropy(self.teacher(**inputs).logits, batch)
            return StepOutput(ce, {"teacher_ce": ce.item()})
        logits, (h_student,) = features(self.student, inputs, [p.layer])
        ce = self.cross_entropy(logits, batch)
        if p.kd_ratio == 0:
            return StepOutput(ce, {"ce": ce.item()})
        with torch.no_grad():
            _, (h_teacher,) = features(self.teacher, inputs, [p.layer])
        hidden = hidden_distance(h_student, h_teacher, batch["attention_mask"], p)
        total = p.kd_ratio * p.hidden_weight * hidden + (1 - p.kd_ratio) * ce
        return StepOutput(total, {"hidden": hidden.item(), "ce": ce.item()})
