"""Alignment with Smooth and High-Quality expert trajectories (Shen, Yang, Wang, Wu, Wang, Zhang 2024,
"Efficient Dataset Distillation through Alignment with Smooth and High-Quality Expert Trajectories",
AST): MTT with smooth experts, a representative initialisation and a class-balanced inner loop.

1. Smooth experts. A student matching a trajectory that jumps between epochs cannot follow it; the
   paper regulates the rate at which expert parameters change by clipping during expert training.
   Implemented here as clipping of each expert step's gradient norm (``experts.clip`` = c):

       g <- g * min(1, c / ||g||),   theta <- theta - lr * g,   so ||theta_{s+1} - theta_s|| <= lr * c.

2. Representative initialisation. Random real images make distillation sensitive to the draw; the
   IPC images of class c start as the real images nearest to the centroids of a k-means (k = IPC, on
   pixels, seeded) of class c's real images:  x_{c,j} = argmin_{x in D_c} ||x - mu_{c,j}||, distinct
   (``mtt.representative``, ``init: representative``, shq's default).

3. Balanced inner loop. Each inner step trains on a class-stratified minibatch b_n with
   max(1, ``batch_syn`` // K) images of every class (all images when ``batch_syn`` is 0), and the
   inner loss is the mean over classes of each class's mean cross-entropy,

       l_bal(b_n) = (1/K) sum_c (1/|b_{n,c}|) sum_{i in b_{n,c}} CE(f(A(x_i); theta_hat), y_i),

   which, with equal |b_{n,c}|, is the minibatch mean, so ``unroll``'s loss is kept and only the
   sampling changes: no class is missing from, or over-represented in, an inner step.

The outer objective is MTT's eq. 2, L = ||theta_hat_{t+N} - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2.
Not implemented: the paper's gradient penalty on the experts and its two enhancements (intermediate
matching loss, weight perturbation).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from stillroom.plugins.dataset.experts import ExpertConfig
from stillroom.plugins.dataset.methods.mtt import MTT, MTTParams


class SHQParams(MTTParams):
    init: Literal["representative", "real", "noise"] = "representative"
    balanced: bool = Field(True, description="class-stratified inner minibatches")
    experts: ExpertConfig = Field(default_factory=lambda: ExpertConfig(clip=1.5))


class SHQ(MTT):
    name = "shq"
    description = (
        "trajectory matching on clipped (smooth) experts, k-means initialisation, balanced inner loop"
    )
    paper = (
        "Shen et al. 2024, Efficient Dataset Distillation through Alignment with Smooth and High-Quality "
        "Expert Trajectories"
    )
    Params = SHQParams

    def minibatch(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """A class-stratified minibatch: max(1, batch // K) images of every class (0: all images)."""
        labels = self.synthetic.labels
        if not self.params.balanced or not batch:
            return torch.randperm(len(labels), generator=generator)[: batch or len(labels)]
        per_class = max(1, batch // self.real.classes)
        picks = []
        for c in range(self.real.classes):
            members = torch.nonzero(labels == c).flatten()
            picks.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
        return torch.cat(picks)
