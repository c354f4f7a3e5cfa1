"""Prototype-sample relation distillation (Asadi, Davari, Mudur, Aljundi & Belilovsky, ICML 2023,
"Prototype-Sample Relation Distillation: Towards Replay-Free Continual Learning", arXiv:2303.14771).

The classes arrive as a sequence of tasks (``tasks``; default digits 0-4, then 5-9), each trained for
an equal share of ``train.steps`` on its own classes' images only; no image of an earlier task is
kept or replayed. Embeddings z = f(x) / |f(x)| live on the unit sphere beside one prototype p_c per
class (the student's cosine head, so prediction over all classes seen is the nearest prototype:
logits <z, p_c / |p_c|> / tau, what the exported graph computes). On a batch of task t, with C_t its
classes and C_old the classes of the earlier tasks:

1. the representation learns by supervised contrast (Khosla et al. 2020, L_out) within the batch,
   P(i) the other images of i's class, A(i) all other images:
      L_SC = mean_i -1/|P(i)| sum_{p in P(i)} log(exp(z_i.z_p / tau_c) / sum_{a in A(i)} exp(z_i.z_a / tau_c))
2. the current classes' prototypes learn by cross-entropy over C_t only, on embeddings whose
   gradient is stopped (the prototypes follow the representation, they do not shape it):
       L_p = mean_i -log( exp(sg(z_i).p_(y_i) / tau) / sum_{c in C_t} exp(sg(z_i).p_c / tau) )
3. relation distillation keeps the old prototypes meaningful without their data: the similarity
   distribution of each new image over the old prototypes,
       q_i^t(c) = exp(z_i.p_c / tau) / sum_{c' in C_old} exp(z_i.p_c' / tau),  c in C_old,
   under the current model (gradient into both f and the old p_c) must stay what the model at the end
   of the previous task (its embedding and its prototypes, frozen) gave:
       L_d = mean_i KL(q_i^(t-1) || q_i^t)

    L = L_SC + L_p + lambda * L_d        (lambda = ``relation_weight``; L_d is absent on the first task)

``relation_weight: 0`` is plain fine-tuning on the same sequence, the baseline. Prototypes are
normalised wherever they are used (the dot products above are cosines). The evaluation reports
accuracy over all classes, and over the images of the earlier tasks' classes (``old_accuracy``) and
of the last task's (``new_accuracy``). The teacher is not used for training (the method needs no
teacher: the teacher directory only fixes the classes, the input and the agreement reported).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from pydantic import Field, field_validator
from torch.nn import functional as F

from stillroom.core.errors import StillroomError
from stillroom.core.method import Params, Role, StepOutput
from stillroom.plugins.classifier import metrics
from stillroom.plugins.classifier.base import ClassifierMethod


class PRDParams(Params):
    tasks: list[list[int]] = Field(
        [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], min_length=2, description="the classes of each task, in order"
    )
    temperature: float = Field(0.1, gt=0, description="tau: prototype similarities and the cosine head")
    contrast_temperature: float = Field(0.1, gt=0, description="tau_c of the supervised contrastive loss")
    relation_weight: float = Field(1.0, ge=0, description="lambda of L_d; 0 is plain fine-tuning")

    @field_validator("tasks")
    @classmethod
    def disjoint(cls, tasks: list[list[int]]) -> list[list[int]]:
        flat = [c for task in tasks for c in task]
        if not all(tasks) or len(set(flat)) != len(flat):
            raise ValueError("every task needs classes and no class may be in two tasks")
        return tasks


def supervised_contrastive(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """L_SC of unit embeddings z [B, D], averaged over the anchors that have a positive."""
    logits = z @ z.T / temperature
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    log_prob = logits.masked_fill(eye, float("-inf")).log_softmax(-1).masked_fill(eye, 0.0)
    positives = (labels[:, None] == labels[None, :]) & ~eye
    count = positives.sum(-1)
    has = count > 0
    per_anchor = -(log_prob * positives).sum(-1)[has] / count[has]
    return per_anchor.mean() if has.any() else z.sum() * 0.0


def prototype_logits(z: torch.Tensor, prototypes: torch.Tensor, temperature: float) -> torch.Tensor:
    """<z, p_c / |p_c|> / tau for unit embeddings z [B, D] and prototypes [C, D]."""
    return z @ F.normalize(prototypes, dim=-1).T / temperature


def relation_distillation(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """mean_i KL(softmax(old_i) || softmax(new_i)) of similarity logits [B, |C_old|]."""
    log_old, log_new = old.log_softmax(-1), new.log_softmax(-1)
    return (log_old.exp() * (log_old - log_new)).sum(-1).mean()


class PrototypeRelation(ClassifierMethod):
    name = "prototype_relation"
    description = "replay-free class-incremental learning: SupCon + prototypes + prototype-sample relation KD"
    paper = "Asadi et al. 2023, Prototype-Sample Relation Distillation: Towards Replay-Free Continual ..."
    Params = PRDParams

    @property
    def needs_teacher(self) -> bool:
        return False

    def student_config(self):
        return (
            super()
            .student_config()
            .model_copy(update={"head": "cosine", "temperature": self.params.temperature})
        )

    def build(self) -> dict[str, Role]:
        roles = super().build()
        classes = self.spec.num_classes
        outside = sorted({c for task in self.params.tasks for c in task if not 0 <= c < classes})
        if outside:
            raise StillroomError(
                f"prototype_relation: method.tasks names classes {outside}; the teacher has 0..{classes - 1}",
                "list only the teacher's classes in method.tasks",
            )
        labels = self.labels.numpy()
        self.task_items = [torch.from_numpy(np.flatnonzero(np.isin(labels, t))) for t in self.params.tasks]
        empty = [t for t, items in zip(self.params.tasks, self.task_items, strict=True) if not len(items)]
        if empty:
            raise StillroomError(
                f"prototype_relation: the training split has no image of task {empty[0]}",
                "give data.source images of every task's classes",
            )
        self.task = 0
        self.previous = copy.deepcopy(self.student)  # the model at the end of the previous task
        roles["previous"] = Role(self.previous, trainable=False, checkpoint=True)
        return roles

    # -- the task sequence --------------------------------------------------------------------------
    def task_of(self, step: int) -> int:
        """Task k trains steps [k * S / T, (k + 1) * S / T) of S = train.steps."""
        return min(len(self.params.tasks) - 1, step * len(self.params.tasks) // self.recipe.train.steps)

    def dataset(self) -> range:
        """Item j of task k is its (j mod n_k)-th training image: every task draws from its own images."""
        return range(max(len(items) for items in self.task_items))

    def collate(self, items: list[int]) -> dict[str, torch.Tensor]:
        own = self.task_items[self.task]
        return super().collate([int(own[i % len(own)]) for i in items])

    def after_step(self, step: int, metrics: dict[str, float]) -> None:
        task = self.task_of(step + 1)
        if task != self.task:
            self.previous.load_state_dict(self.student.state_dict())
            self.task = task

    def state_dict(self) -> dict:
        return {"task": self.task}

    def load_state_dict(self, state: dict) -> None:
        self.task = state.get("task", 0)

    # -- the objective ------------------------------------------------------------------------------
    def loss(self, role: str, batch, step: int) -> StepOutput:
        p = self.params
        images, labels = batch["images"], batch["labels"]
        z = F.normalize(self.student.features(images).float(), dim=-1)
        prototypes = self.student.head.weight
        current = torch.tensor(p.tasks[self.task], device=images.device)
        contrast = supervised_contrastive(z, labels, p.contrast_temperature)
        target = (labels[:, None] == current[None, :]).float().argmax(-1)  # y's position within C_t
        proto = F.cross_entropy(prototype_logits(z.detach(), prototypes[current], p.temperature), target)
        loss, logged = contrast + proto, {"supcon": contrast.item(), "prototype": proto.item()}
        if self.task > 0 and p.relation_weight > 0:
            old = torch.tensor([c for t in p.tasks[: self.task] for c in t], device=images.device)
            with torch.no_grad():
                z_old = F.normalize(self.previous.features(images).float(), dim=-1)
                q_old = prototype_logits(z_old, self.previous.head.weight[old], p.temperature)
            relation = relation_distillation(prototype_logits(z, prototypes[old], p.temperature), q_old)
            loss, logged["relation"] = loss + p.relation_weight * relation, relation.item()
        return StepOutput(loss, logged)

    def scores(self, probs: np.ndarray) -> dict[str, float]:
        """Accuracy over all classes, and on the earlier tasks' and the last task's images."""
        old = np.isin(self.heldout_labels, [c for t in self.params.tasks[:-1] for c in t])
        new = np.isin(self.heldout_labels, self.params.tasks[-1])
        return {
            **super().scores(probs),
            "old_accuracy": metrics.accuracy(probs[old], self.heldout_labels[old]),
            "new_accuracy": metrics.accuracy(probs[new], self.heldout_labels[new]),
        }
