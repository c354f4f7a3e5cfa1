"""SinKD for causal LMs (Cui et al. 2024, "SinKD: Sinkhorn Distance Minimization for Knowledge
Distillation", IEEE TNNLS): a batch-wise Sinkhorn distance between the teacher's and the student's
next-token distributions, added to logit KD / cross-entropy:

    L = kd_ratio * D(p, q) + (1 - kd_ratio) * CE + weight * W_eps({p_i}, {q_j})

    W_eps = sum_ij P_ij C_ij,   C_ij = ||p_i - q_j||_1,   P = the entropic (epsilon) optimal plan

Per-position divergences compare each p_i with its own q_i only; the Sinkhorn term also sees how the
distributions of the batch relate to each other. Its cost matrix is N x N over positions, so
``positions`` counted positions are drawn at random each step (torch's global RNG: a resumed run
draws the same ones).
"""

from __future__ import annotations

import torch
from pydantic import Field

from stillroom.core.method import StepOutput
from stillroom.plugins.lm import losses
from stillroom.plugins.lm.methods.kd import KD, KDParams


class SinkhornParams(KDParams):
    weight: float = Field(1.0, ge=0, description="weight of the Sinkhorn term")
    epsilon: float = Field(0.1, gt=0, description="entropic regularisation")
    iters: int = Field(20, gt=0, description="Sinkhorn iterations")
    positions: int = Field(256, gt=1, description="positions per step entering the N x N cost")


class Sinkhorn(KD):
    name = "sinkhorn"
    description = "SinKD: batch-wise Sinkhorn distance between teacher and student distributions + KD/CE"
    paper = "Cui et al. 2024, SinKD: Sinkhorn Distance Minimization for Knowledge Distillation"
    Params = SinkhornParams

    def loss(self, role: str, batch, step: int) -> StepOutput:
        p = self.params
        logits = self.student(**self.model_inputs(batch)).logits
        ce = self.cross_entropy(logits, batch)
        student, teacher = self.targets(batch, logits, p.temperature)
        mask = self.loss_mask(batch)
        flat = mask.reshape(-1).nonzero().squeeze(1)
        if flat.numel() > p.positions:
            flat = flat[torch.randperm(flat.numel(), device=flat.device)[: p.positions]]
        s_rows = student.reshape(-1, student.shape[-1])[flat]
        t_rows = teacher.reshape(-1, teacher.shape[-1])[flat]
        sink = losses.sinkhorn_loss(s_rows, t_rows, p.epsilon, p.iters, p.temperature)
        total = (1 - p.kd_ratio) * ce + p.weight * sink
        metrics = {"ce": ce.item(), "sinkhorn": sink.item()}
        if p.kd_ratio > 0:
            kd = losses.divergence(
                p.divergence, student, teacher, mask, p.temperature, beta=p.beta, alpha=p.alpha
            )
            total = total + p.kd_ratio * kd
            metrics["kd"] = kd.item()
        return StepOutput(total, metrics)
