"""Difficulty-Aligned Trajectory Matching (Guo, Wang, Chen, Zhang, Liu, Wang, Huang 2024, "Towards
Lossless Dataset Distillation via Difficulty-Aligned Trajectory Matching"): MTT whose matching range
follows the IPC, and whose labels are learned soft labels.

Difficulty alignment. Early expert epochs teach easy patterns, which is all a tiny set can hold; late
epochs teach hard ones, which only a large set can. So the start epoch t of a match is drawn from a
range [T-, T) that the recipe sets per IPC (early for IPC 1, later for IPC 50), and whose upper bound
moves up during distillation ("sequential generation"), reaching T+ after a fraction
``expansion_end`` of the outer steps k of K (``train.steps``):

    T(k) = T + floor((T+ - T) * min(1, k / (expansion_end * K))),   t ~ U{T-, ..., T(k) - 1}

(T- ``min_start_epoch``, T ``initial_max_start_epoch``, T+ ``max_start_epoch``). The objective is MTT's
eq. 2 unchanged: L = ||theta_hat_{t+N} - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2.

Soft labels. Each synthetic image i carries learnable logits z_i, initialised as DATM's code does
(its ``Label_Model_Timestamp = -1``: the experts at their last epoch T_end, the trained experts):
the images are real images that expert 0 classifies correctly (``init: real``; a class with too few
correct ones is filled with its other images, and the card counts them; ``init: representative``
takes the k-means-nearest real images instead), and z_i is the mean logit of the experts that
classify x_i correctly (all experts when none does),

    z_i = mean_{e in C_i} f(x_i; theta*_{e,T_end}),   C_i = {e : argmax_k f(x_i; theta*_{e,T_end})_k = y_i}.

The inner loop trains on the targets softmax(z_i):

    theta_hat_{t+n+1} = theta_hat_{t+n} - alpha * grad_theta CE_soft,
    CE_soft = mean_i sum_k -softmax(z_i)_k log softmax(f(A(x_i); theta_hat_{t+n}))_k

and L is differentiated into the images, alpha and z (z = label_scale * w with the trainer stepping w,
so one optimizer step moves z by about ``label_lr``). The distilled labels are softmax(z), [N, K].
"""

from __future__ import annotations

import math

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn
from torch.func import functional_call

from stillroom.plugins.dataset.data import per_class_sample
from stillroom.plugins.dataset.methods.mtt import MTT, MTTParams, SyntheticSet, unflatten


class DATMParams(MTTParams):
    min_start_epoch: int = Field(0, ge=0, description="T-: the lowest start epoch of a match")
    initial_max_start_epoch: int = Field(1, gt=0, description="T: the first upper bound of start epochs")
    expansion_end: float = Field(0.5, gt=0, le=1, description="fraction of train.steps at which T reaches T+")
    soft_labels: bool = Field(True, description="learn soft labels initialised from an expert's logits")
    label_lr: float = Field(0.1, gt=0, description="optimizer step on the label logits relative to train.lr")

    @model_validator(mode="after")
    def _window(self):
        if not self.min_start_epoch < self.initial_max_start_epoch <= self.max_start_epoch:
            raise ValueError("need min_start_epoch < initial_max_start_epoch <= max_start_epoch")
        return self


def window(step: int, steps: int, p: DATMParams) -> tuple[int, int]:
    """[T-, T(k)): the start epochs a match at outer step ``step`` of ``steps`` may begin at."""
    grown = min(1.0, step / (p.expansion_end * steps))
    upper = p.initial_max_start_epoch + math.floor((p.max_start_epoch - p.initial_max_start_epoch) * grown)
    return p.min_start_epoch, upper


class SoftSyntheticSet(SyntheticSet):
    """D_syn with learnable label logits z = label_scale * w; targets are softmax(z)."""

    def __init__(self, images, labels, syn_lr, lr_scale, logits: torch.Tensor, label_scale: float) -> None:
        super().__init__(images, labels, syn_lr, lr_scale)
        self.w = nn.Parameter(logits.clone() / label_scale)
        self.label_scale = label_scale

    def targets(self) -> torch.Tensor:
        return torch.softmax(self.label_scale * self.w, dim=-1)


class DATM(MTT):
    name = "datm"
    description = "trajectory matching over an IPC-dependent, growing range of expert epochs, soft labels"
    paper = (
        "Guo et al. 2024, Towards Lossless Dataset Distillation via Difficulty-Aligned Trajectory Matching"
    )
    Params = DATMParams

    def dataset(self) -> list[tuple[int, int]]:
        """Items are experts; ``start_epoch`` draws each match's t from the current window."""
        return [(e, self.params.min_start_epoch) for e in range(len(self.trajectories))]

    def start_epoch(self, t: int, step: int) -> int:
        low, high = window(step, self.recipe.train.steps, self.params)
        return int(torch.randint(low, high, (1,)))  # the global RNG: checkpointed, resumes bitwise

    def expert_logits(self, images: torch.Tensor, experts: range) -> torch.Tensor:
        """[E, N, K]: f(x; theta*_{e,T_end}) of the experts ``experts`` at their last epoch (no DSA)."""
        out = []
        with torch.no_grad():
            for e in experts:
                theta = unflatten(self.net, self.trajectories[e][-1].to(self.ctx.device))
                chunks = torch.split(images.to(self.ctx.device), 500)
                out.append(torch.cat([functional_call(self.net, theta, (c,)) for c in chunks]).cpu())
        return torch.stack(out)

    def initial_images(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.params.soft_labels:
            return super().initial_images()
        if self.params.init == "representative":
            images, labels = super().initial_images()
        else:
            images, labels = self.correctly_classified()
        logits = self.expert_logits(images, range(len(self.trajectories)))  # [E, n, K]
        right = (logits.argmax(-1) == labels).float()  # [E, n]
        right[:, right.sum(0) == 0] = 1.0  # no expert right: all of them
        self.init_logits = (logits * right[..., None]).sum(0) / right.sum(0)[:, None]
        return images, labels

    def correctly_classified(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``ipc`` random real images per class that expert 0 (last epoch) classifies correctly."""
        real, ipc = self.real, self.params.ipc
        per_class_sample(real.train_labels, ipc, self.ctx.seed, real.classes)  # one clear error if too few
        images, labels = torch.from_numpy(real.train_images), torch.from_numpy(real.train_labels)
        correct = (self.expert_logits(images, range(1))[0].argmax(-1) == labels).numpy()
        rng = np.random.default_rng(self.ctx.seed)
        picks = []
        for c in range(real.classes):
            members = rng.permutation(np.flatnonzero(real.train_labels == c))
            picks.append(np.concatenate([members[correct[members]], members[~correct[members]]])[:ipc])
        pick = torch.from_numpy(np.concatenate(picks))
        self.extra_card["init_correct"] = f"{int(correct[pick].sum())}/{len(pick)}"
        return images[pick], labels[pick]

    def synthetic_set(self, images: torch.Tensor, labels: torch.Tensor) -> SyntheticSet:
        p = self.params
        if not p.soft_labels:
            return super().synthetic_set(images, labels)
        train_lr = self.recipe.train.lr
        return SoftSyntheticSet(
            images, labels, p.syn_lr, p.lr_lr / train_lr, self.init_logits, p.label_lr / train_lr
        )

    def distilled(self) -> tuple[np.ndarray, np.ndarray]:
        images, labels = super().distilled()
        if not self.params.soft_labels:
            return images, labels
        return images, self.synthetic.targets().detach().cpu().numpy().astype(np.float32)
