"""Matching Training Trajectories (Cazenavette, Wang, Torralba, Efros, Zhu 2022, "Dataset Distillation
by Matching Training Trajectories"), the base of every trajectory-matching method.

Experts (``experts.py``) are ConvNets trained on the real data; theta*_t is an expert's parameters
after epoch t. A step samples an expert and a start epoch t < T+ (``max_start_epoch``), starts a student
at theta_hat_t = theta*_t and trains it for N (``syn_steps``) SGD steps on the synthetic images D_syn
with the learnable learning rate alpha (with DSA on each minibatch b_n):

    theta_hat_{t+n+1} = theta_hat_{t+n} - alpha * grad_theta CE(f(A(b_n); theta_hat_{t+n}), y(b_n))

then compares where it landed with where the expert was M (``expert_epochs``) epochs later (eq. 2):

    L = ||theta_hat_{t+N} - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2

L is differentiated through all N steps into D_syn and alpha (both the trainable ``student`` role,
updated by the trainer's optimizer; alpha = exp(lr_scale * u) so one optimizer step moves log alpha
by about ``lr_lr``). After every outer step D_syn is projected back onto the pixel range [0, 1], so the
images the student trains on are the images shipped. Labels are hard, one class per image; images are
initialised from random real ones (``init: real``, the paper's), or from the real images nearest
to the centroids of a per-class k-means (``init: representative``, the initialisation of Shen et al.
2024, ``shq``), or from uniform noise.

Variants (FTD, DATM, ...) subclass ``MTT`` and override ``matching_loss`` (the objective on the end
points), ``student_end`` (the student's inner loop, ``unroll``), ``start_epoch`` (which t a match
starts at), ``initial_images`` / ``SyntheticSet.targets`` (the initialisation, soft labels) or
``distilled``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn
from torch.func import functional_call

from stillroom.core.errors import StillroomError
from stillroom.core.method import Role, StepOutput
from stillroom.plugins.dataset import experts
from stillroom.plugins.dataset.base import DatasetMethod, DatasetParams
from stillroom.plugins.dataset.convnet import augment, classification_loss
from stillroom.plugins.dataset.data import per_class_sample
from stillroom.plugins.dataset.experts import ExpertConfig


class MTTParams(DatasetParams):
    syn_steps: int = Field(20, gt=0, description="N: student SGD steps on the synthetic data per match")
    expert_epochs: int = Field(2, gt=0, description="M: expert epochs the N student steps should cover")
    max_start_epoch: int = Field(4, gt=0, description="T+: start epochs are drawn from 0 .. T+ - 1")
    syn_lr: float = Field(0.01, gt=0, description="initial learnable student learning rate alpha")
    lr_lr: float = Field(1e-3, gt=0, description="optimizer step on log alpha relative to train.lr")
    batch_syn: int = Field(0, ge=0, description="synthetic images per student step (0: all)")
    init: Literal["real", "representative", "noise"] = "real"
    experts: ExpertConfig = Field(default_factory=ExpertConfig)

    @model_validator(mode="after")
    def _fits(self):
        if self.max_start_epoch + self.expert_epochs > self.experts.epochs:
            raise ValueError("max_start_epoch + expert_epochs must be <= experts.epochs")
        return self


class SyntheticSet(nn.Module):
    """D_syn (pixels, [N, C, H, W]) and the learnable student learning rate alpha = exp(lr_scale * u)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, syn_lr: float, lr_scale: float) -> None:
        super().__init__()
        self.images = nn.Parameter(images.clone())
        self.u = nn.Parameter(torch.tensor(math.log(syn_lr) / lr_scale))
        self.register_buffer("labels", labels.clone())
        self.lr_scale = lr_scale

    def syn_lr(self) -> torch.Tensor:
        return torch.exp(self.lr_scale * self.u)

    @torch.no_grad()
    def project(self) -> None:
        """D_syn <- clip(D_syn, 0, 1): the images stay what ``distilled()`` ships."""
        self.images.clamp_(0, 1)

    def targets(self) -> torch.Tensor:
        """What the inner loop trains on: class indices [N] here, probabilities [N, K] with soft labels."""
        return self.labels


def matching_loss(end: torch.Tensor, target: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """||theta_hat_{t+N} - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2 (MTT eq. 2)."""
    return (end - target).pow(2).sum() / (start - target).pow(2).sum()


def representative(images: np.ndarray, labels: np.ndarray, ipc: int, classes: int, seed: int) -> np.ndarray:
    """Per class, the indices of the real images nearest to the ``ipc`` k-means centroids (distinct):
    x_{c,j} = argmin_{x in D_c} ||x - mu_{c,j}|| (k-means on pixels, k = ipc, seeded)."""
    try:
        from scipy.cluster.vq import kmeans2
    except ImportError:
        raise StillroomError(
            "the representative initialisation needs scipy's k-means, which is not installed",
            "pip install 'stillroom[search]', or set method.init=real",
        ) from None
    picks = []
    for c in range(classes):
        members = np.flatnonzero(labels == c)
        points = images[members].reshape(len(members), -1).astype(np.float64)
        centroids, _ = kmeans2(points, ipc, minit="++", seed=seed + c)
        taken: list[int] = []
        for mu in centroids:
            order = np.argsort(((points - mu) ** 2).sum(1), kind="stable")
            taken.append(next(int(i) for i in order if i not in taken))
        picks.append(members[taken])
    return np.concatenate(picks)


def unflatten(net: nn.Module, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    names, shapes = zip(*[(n, p.shape) for n, p in net.named_parameters()], strict=True)
    chunks = torch.split(flat, [math.prod(s) for s in shapes])
    return {n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}


def unroll(
    net: nn.Module,
    start: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    syn_lr: torch.Tensor,
    steps: int,
    batch: int,
    strategy: str,
    generator: torch.Generator,
    sample: Callable[[int, torch.Generator], torch.Tensor] | None = None,
) -> torch.Tensor:
    """theta_hat_{t+N}: ``steps`` differentiable SGD steps from ``start`` on (images, labels), each on
    the minibatch ``sample(batch, generator)`` (default: ``batch`` images drawn at random, 0: all)."""
    theta = start.clone().requires_grad_(True)
    for _ in range(steps):
        if sample is None:
            pick = torch.randperm(len(images), generator=generator)[: batch or len(images)]
        else:
            pick = sample(batch, generator)
        logits = functional_call(net, unflatten(net, theta), (augment(images[pick], strategy, generator),))
        (grad,) = torch.autograd.grad(classification_loss(logits, labels[pick]), theta, create_graph=True)
        theta = theta - syn_lr * grad
    return theta


class MTT(DatasetMethod):
    name = "mtt"
    description = (
        "trajectory matching: N student steps on the synthetic set should land M expert epochs later"
    )
    paper = "Cazenavette et al. 2022, Dataset Distillation by Matching Training Trajectories"
    Params = MTTParams
    Synthetic: ClassVar[type[SyntheticSet]] = SyntheticSet
    # which synthetic images an inner step trains on, (batch, generator) -> indices; None: at random
    minibatch: Callable[[int, torch.Generator], torch.Tensor] | None = None

    def build_roles(self) -> dict[str, Role]:
        p, real = self.params, self.real
        self.trajectories, expert_cpu = experts.trajectories(real, p.experts)
        self.extra_card = {"expert_cpu_minutes": round(expert_cpu / 60, 3), "experts": p.experts.model_dump()}
        self.net = experts.network(real, p.experts.width, p.experts.depth).to(self.ctx.device)
        self.net.requires_grad_(False)
        images, labels = self.initial_images()
        if p.init == "noise":
            images = torch.rand(images.shape, generator=torch.Generator().manual_seed(self.ctx.seed))
        self.synthetic = self.synthetic_set(images, labels)
        return {"student": Role(self.synthetic)}

    def initial_images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """D_syn's starting pixels and labels: ``ipc`` real images per class (seeded), drawn at random
        or (``init: representative``) nearest to the per-class k-means centroids."""
        p, real = self.params, self.real
        pick = per_class_sample(real.train_labels, p.ipc, self.ctx.seed, real.classes)  # or one clear error
        if p.init == "representative":
            pick = representative(real.train_images, real.train_labels, p.ipc, real.classes, self.ctx.seed)
        return torch.from_numpy(real.train_images[pick]), torch.from_numpy(real.train_labels[pick])

    def synthetic_set(self, images: torch.Tensor, labels: torch.Tensor) -> SyntheticSet:
        return self.Synthetic(images, labels, self.params.syn_lr, self.params.lr_lr / self.recipe.train.lr)

    def dataset(self) -> list[tuple[int, int]]:
        """Items are (expert, start epoch) pairs; the trainer's seeded stream samples them."""
        return [(e, t) for e in range(len(self.trajectories)) for t in range(self.params.max_start_epoch)]

    def collate(self, items: list[tuple[int, int]]) -> list[tuple[int, int]]:
        return items

    def loss(self, role: str, batch: list[tuple[int, int]], step: int) -> StepOutput:
        p, syn = self.params, self.synthetic
        # the inner loop's randomness comes from the global RNG, which checkpoints save and restore
        gen = torch.Generator().manual_seed(int(torch.randint(2**62, (1,))))
        losses = []
        for expert, t in batch:
            t = self.start_epoch(t, step)
            trajectory = self.trajectories[expert].to(self.ctx.device)
            start, target = trajectory[t], trajectory[t + p.expert_epochs]
            losses.append(self.matching_loss(self.student_end(start, gen), target, start))
        loss = torch.stack(losses).mean()
        return StepOutput(loss, {"syn_lr": float(syn.syn_lr().detach())})

    def after_step(self, step: int, metrics: dict[str, float]) -> None:
        self.synthetic.project()

    def start_epoch(self, t: int, step: int) -> int:
        """The start epoch of a match: the sampled item's t (DATM draws it from a moving window)."""
        return t

    def student_end(self, start: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """theta_hat_{t+N}: the student's N steps on the synthetic set from ``start`` = theta*_t."""
        p, syn = self.params, self.synthetic
        images, labels, lr = syn.images, syn.targets(), syn.syn_lr()
        return unroll(
            self.net, start, images, labels, lr, p.syn_steps, p.batch_syn, p.experts.augment, generator,
            self.minibatch,
        )  # fmt: skip

    def matching_loss(self, end: torch.Tensor, target: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        return matching_loss(end, target, start)

    def distilled(self) -> tuple[np.ndarray, np.ndarray]:
        images = self.synthetic.images.detach().clamp(0, 1).cpu().numpy().astype(np.float32)
        return images, self.synthetic.labels.cpu().numpy().astype(np.int64)
