"""Committee Voting Dataset Distillation (CV-DD; "Dataset Distillation via Committee Voting",
arXiv 2501.07575, 2025): a committee of networks trained on the real data guides the synthesis of the
images and votes their soft labels, each member weighted by its prior performance.

Committee. Members i = 1..M are ConvNets of different widths / depths and seeds (``committee``: each
entry an ``ExpertConfig``, ``count`` seeds of it), trained on the real training split with SGD and DSA
(the expert trajectories of ``experts.py``, cached and shared with MTT; a member is a trajectory's last
point). Prior-performance-guided weights (the paper's PPG voting), p_i the member's accuracy on the real
training split:

    alpha_i = exp(p_i / tau) / sum_j exp(p_j / tau)                    (tau: ``prior_temperature``)

Synthesis. D_syn = {x_j, y_j} starts from ``ipc`` random real images per class (the paper starts from
real patches). Each outer step samples a sub-committee S of ``members_per_step`` members (global RNG)
and minimises, on the DSA-augmented images A(x),

    L = sum_{i in S} alpha_i / (sum_{k in S} alpha_k) * [ CE(f_i(A(x)), y) + lambda * R_i(A(x)) ]
    R_i(x) = sum_l ||mu_l(x) - mu_l^real||_2 + ||sigma^2_l(x) - sigma^2_l^real||_2

with lambda = ``stat_weight``,

where mu_l, sigma^2_l are the per-channel mean and variance (over images and positions) of the
conv output entering member i's l-th normalisation layer, and mu_l^real, sigma^2_l^real the same over
the whole real training split. The paper matches the BatchNorm running statistics (SRe2L's R_BN);
ConvNet-3 normalises per instance, so the real statistics are measured once instead. Pixels are
clamped to [0, 1] after every step.

Soft labels (the committee's vote, temperature T = ``temperature``), on the final images without
augmentation, over the whole committee:

    y_soft_j = sum_i alpha_i * softmax(f_i(x_j) / T)

stored as float32 [N, K]. (The paper relabels every evaluation epoch's augmented batch; a distilled set
here is a fixed file, so the vote is taken once.)
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from pydantic import Field, PositiveInt
from torch import nn
from torch.nn import functional as F

from stillroom.core.method import Role, StepOutput
from stillroom.plugins.dataset import experts
from stillroom.plugins.dataset.base import DatasetMethod, DatasetParams
from stillroom.plugins.dataset.convnet import STRATEGY, augment
from stillroom.plugins.dataset.data import per_class_sample
from stillroom.plugins.dataset.experts import ExpertConfig


def default_committee() -> list[ExpertConfig]:
    """Trained members: the students of a committee's vote land near its accuracy (after 4 epochs,
    92.5-93.1 % on the MNIST train split, IPC 50 students scored 93.3; after 20, 97.4-97.9 % and 96.2)."""
    return [
        ExpertConfig(count=2, epochs=20, lr=0.05, width=32, depth=3),
        ExpertConfig(count=1, epochs=20, lr=0.05, width=16, depth=2),
    ]


class CVDDParams(DatasetParams):
    committee: list[ExpertConfig] = Field(
        default_factory=default_committee, min_length=1, description="member architectures, count seeds each"
    )
    members_per_step: PositiveInt = Field(2, description="|S|: committee members sampled per outer step")
    prior_temperature: float = Field(0.05, gt=0, description="tau of the prior-performance weights")
    temperature: float = Field(1.0, gt=0, description="T of the committee's soft-label vote")
    stat_weight: float = Field(0.1, ge=0, description="lambda of the feature-statistics term R")
    augment: str = Field(STRATEGY, description="DSA strategy on the synthetic images while synthesising")


class SyntheticImages(nn.Module):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        super().__init__()
        self.images = nn.Parameter(images.clone())
        self.register_buffer("labels", labels.clone())


@contextmanager
def recording(net: nn.Module):
    """Collects (channel mean, channel mean of squares) of the input of every GroupNorm in ``net``."""
    moments: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(_module, inputs):
        moments.append((inputs[0].mean((0, 2, 3)), inputs[0].pow(2).mean((0, 2, 3))))

    handles = [m.register_forward_pre_hook(hook) for m in net.modules() if isinstance(m, nn.GroupNorm)]
    try:
        yield moments
    finally:
        for handle in handles:
            handle.remove()


def statistics(
    net: nn.Module, images: torch.Tensor, chunk: int = 500
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(mu_l, sigma^2_l) per normalisation layer over all of ``images`` (chunked, equal-weighted by image)."""
    totals = None
    with torch.no_grad():
        for part in torch.split(images, chunk):
            with recording(net) as moments:
                net(part)
            scaled = [(m * len(part), s * len(part)) for m, s in moments]
            totals = (
                scaled
                if totals is None
                else [(a + m, b + s) for (a, b), (m, s) in zip(totals, scaled, strict=True)]
            )
    return [(m / len(images), s / len(images) - (m / len(images)) ** 2) for m, s in totals]


def statistic_distance(moments, real) -> torch.Tensor:
    """R = sum_l ||mu_l - mu_l^real||_2 + ||sigma^2_l - sigma^2_l^real||_2 from recorded moments."""
    return sum(
        torch.linalg.vector_norm(m - rm) + torch.linalg.vector_norm(s - m**2 - rv)
        for (m, s), (rm, rv) in zip(moments, real, strict=True)
    )


def prior_weights(performance: torch.Tensor, tau: float) -> torch.Tensor:
    """alpha_i = softmax(p / tau)_i."""
    return torch.softmax(performance / tau, dim=0)


def synthesis_loss(members, real_stats, alphas, images, labels, stat_weight) -> tuple[torch.Tensor, dict]:
    """sum_i alpha_i / sum alpha * [CE(f_i(x), y) + lambda * R_i(x)] over the given (sub-)committee."""
    weights = alphas / alphas.sum()
    total, ce_sum, r_sum = 0.0, 0.0, 0.0
    for net, stats, w in zip(members, real_stats, weights, strict=True):
        with recording(net) as moments:
            logits = net(images)
        ce, r = F.cross_entropy(logits, labels), statistic_distance(moments, stats)
        total = total + w * (ce + stat_weight * r)
        ce_sum, r_sum = ce_sum + float(w) * ce.item(), r_sum + float(w) * r.item()
    return total, {"ce": ce_sum, "stat": r_sum}


def vote(members, alphas, images, temperature) -> torch.Tensor:
    """y_soft = sum_i alpha_i softmax(f_i(x) / T), rows summing to 1."""
    with torch.no_grad():
        return sum(
            a * torch.softmax(net(images) / temperature, -1) for net, a in zip(members, alphas, strict=True)
        )


def accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        pred = torch.cat([net(part).argmax(-1) for part in torch.split(images, 500)])
    return float((pred == labels).float().mean())


class CVDD(DatasetMethod):
    name = "cvdd"
    description = "a prior-weighted committee of ConvNets guides image synthesis and votes soft labels"
    paper = "Dataset Distillation via Committee Voting (arXiv 2501.07575, 2025)"
    Params = CVDDParams

    def build_roles(self) -> dict[str, Role]:
        p, real = self.params, self.real
        x, y = torch.from_numpy(real.train_images), torch.from_numpy(real.train_labels)
        self.members, cpu = [], 0.0
        for cfg in p.committee:
            runs, spent = experts.trajectories(real, cfg)
            cpu += spent
            for trajectory in runs:
                net = experts.network(real, cfg.width, cfg.depth)
                nn.utils.vector_to_parameters(trajectory[-1], net.parameters())
                self.members.append(net.requires_grad_(False).eval().to(self.ctx.device))
        self.real_stats = [statistics(net, x.to(self.ctx.device)) for net in self.members]
        performance = torch.tensor(
            [accuracy(net, x.to(self.ctx.device), y.to(self.ctx.device)) for net in self.members]
        )
        self.alphas = prior_weights(performance, p.prior_temperature).to(self.ctx.device)
        self.extra_card = {
            "expert_cpu_minutes": round(cpu / 60, 3),  # the committee's training
            "committee": [c.model_dump() for c in p.committee],
            "committee_train_accuracy": performance.tolist(),
            "committee_weights": self.alphas.tolist(),
        }
        pick = per_class_sample(real.train_labels, p.ipc, self.ctx.seed, real.classes)
        self.synthetic = SyntheticImages(x[pick], y[pick])
        return {"student": Role(self.synthetic)}

    def dataset(self) -> range:
        return range(1)  # every step optimises the whole synthetic set; there is no real-data stream

    def collate(self, items: list[int]) -> list[int]:
        return items

    def loss(self, role: str, batch, step: int) -> StepOutput:
        p, syn = self.params, self.synthetic
        chosen = torch.randperm(len(self.members))[: p.members_per_step].tolist()
        gen = torch.Generator().manual_seed(int(torch.randint(2**62, (1,))))
        images = augment(syn.images, p.augment, gen)
        loss, metrics = synthesis_loss(
            [self.members[i] for i in chosen],
            [self.real_stats[i] for i in chosen],
            self.alphas[chosen],
            images,
            syn.labels,
            p.stat_weight,
        )
        return StepOutput(loss, metrics)

    def after_step(self, step: int, metrics: dict[str, float]) -> None:
        with torch.no_grad():
            self.synthetic.images.clamp_(0, 1)

    def distilled(self) -> tuple[np.ndarray, np.ndarray]:
        images = self.synthetic.images.detach().clamp(0, 1)
        soft = vote(self.members, self.alphas, images, self.params.temperature)
        return images.cpu().numpy().astype(np.float32), soft.cpu().numpy().astype(np.float32)
