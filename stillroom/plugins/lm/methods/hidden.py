"""Intermediate-representation matching (FitNets, Romero et al. 2015, "FitNets: Hints for Thin Deep
Nets"; for transformers e.g. TinyBERT, Jiao et al. 2020; MiniLM-style layer mapping):

    L = hidden_weight * 1/|P| sum_{(s, t) in P} d(W_s h_student^(s), h_teacher^(t))
        + kd_ratio * D(p_teacher, q_student) + (1 - kd_ratio) * CE

    d = mse:      1/D ||W h_s - h_t||^2           (per position, averaged over counted positions)
    d = cosine:   1 - cos(W h_s, h_t)
    d = mi_alpha: -I_alpha(W h_s; h_t)             (Distiller's MI-alpha, He et al. 2021; below)

MI-alpha (He et al. 2021, "Distiller: A Systematic Study of Model Distillation Methods in Natural
Language Processing") treats intermediate distillation as maximising the mutual information between
the student's and the teacher's representations through the interpolated lower bound I_alpha of Poole
et al. 2019 (``losses.mi_alpha_bound``; baseline q = 1). The N counted positions of the batch are the
samples: the critic scores every (student position k, teacher position i) pair,

    S_ik = f(W h_s,k, h_t,i) = -||W h_s,k - h_t,i||^2 / (D * tau * v),   v = mean_d Var_i(h_t,i,d),

a Gaussian critic whose scale v (the teacher features' variance, detached) makes the temperature tau
(``mi_temperature``) independent of the layer's magnitude. ``mi_alpha`` = 1 gives InfoNCE (a
contrastive objective: the student position must be nearer its own teacher position than the others,
as in CRD); ``mi_alpha`` = 0 gives 1/(tau v) * mse - 1 + mean_{i != k} e^{S_ik}: the MSE objective
plus a repulsion from the other positions that vanishes when they are far apart. The critic's form and
the variance scale are our choice (the bound holds for any critic).

Pairs (student layer, teacher layer) are given by index into ``output_hidden_states`` (0 = the
embeddings, i = the output of block i) or by module path (the module's output, e.g.
``model.layers.1.mlp``). By default student block j is paired with teacher block round(j * T / S),
the uniform mapping. W is a learned linear projection where the widths differ (identity otherwise);
the projections live in the student role's ``aux`` (trained with the student, checkpointed, never
saved with it). The logit term is any divergence of ``kd`` (``divergence``, ``kd_ratio``;
``kd_ratio: 0`` leaves hidden matching + CE).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from stillroom.core.errors import StillroomError
from stillroom.core.method import Params, StepOutput
from stillroom.plugins.lm import losses
from stillroom.plugins.lm.methods.kd import KD, KDParams


class HiddenObjective(Params):
    """How a student representation is compared with a teacher one (also used by ``self_distill``)."""

    hidden_loss: Literal["mse", "cosine", "mi_alpha"] = "mse"
    mi_alpha: float = Field(0.5, ge=0, le=1, description="mi_alpha: 1 = InfoNCE-like, 0 = MSE-like")
    mi_temperature: float = Field(0.1, gt=0, description="mi_alpha: critic temperature tau")


class HiddenParams(KDParams, HiddenObjective):
    pairs: list[tuple[int | str, int | str]] | None = Field(
        None, description="[[student, teacher], ...] layer indices or module paths; default: uniform"
    )
    hidden_weight: float = Field(1.0, ge=0)
    kd_ratio: float = Field(
        0.5, ge=0, le=1, description="weight of the logit KD term; 1 - kd_ratio weights CE"
    )


class Hidden(KD):
    name = "hidden"
    description = "hidden-state matching (layer pairs, learned projections, mse|cosine) + logit KD/CE"
    paper = "Romero et al. 2015, FitNets: Hints for Thin Deep Nets"
    Params = HiddenParams
    needs_live_teacher = True

    def aux_modules(self, teacher) -> torch.nn.Module:
        self.pairs = self.params.pairs or uniform_pairs(
            self.student.config.num_hidden_layers, teacher.config.num_hidden_layers
        )
        ids = torch.zeros(1, 2, dtype=torch.long, device=self.ctx.device)
        probe = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        with torch.no_grad():
            _, s_feats = features(self.student, probe, [s for s, _ in self.pairs])
            _, t_feats = features(teacher, probe, [t for _, t in self.pairs])
        self.projections = torch.nn.ModuleList(
            torch.nn.Identity()
            if s.shape[-1] == t.shape[-1]
            else torch.nn.Linear(s.shape[-1], t.shape[-1], bias=False)
            for s, t in zip(s_feats, t_feats, strict=True)
        )
        return (
            self.projections.to(self.ctx.device) if any(True for _ in self.projections.parameters()) else None
        )

    def loss(self, role: str, batch, step: int) -> StepOutput:
        p = self.params
        inputs = self.model_inputs(batch)
        logits, s_feats = features(self.student, inputs, [s for s, _ in self.pairs])
        with torch.no_grad():
            t_logits, t_feats = features(self.teacher, inputs, [t for _, t in self.pairs])
        mask = batch["attention_mask"]
        hidden = sum(
            hidden_distance(proj(s), t, mask, p)
            for proj, s, t in zip(self.projections, s_feats, t_feats, strict=True)
        ) / len(self.pairs)
        ce = self.cross_entropy(logits, batch)
        total = p.hidden_weight * hidden + (1 - p.kd_ratio) * ce
        metrics = {"hidden": hidden.item(), "ce": ce.item()}
        if p.kd_ratio > 0:
            kd = losses.divergence(
                p.divergence,
                logits[:, :-1],
                t_logits[:, :-1],
                self.loss_mask(batch),
                p.temperature,
                beta=p.beta,
                alpha=p.alpha,
            )
            total = total + p.kd_ratio * kd
            metrics["kd"] = kd.item()
        return StepOutput(total, metrics)


def uniform_pairs(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """Student block j (1-based output index) -> teacher block round(j * T / S)."""
    return [(j, round(j * teacher_layers / student_layers)) for j in range(1, student_layers + 1)]


def hidden_distance(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, objective: HiddenObjective
) -> torch.Tensor:
    """Per-position mse (mean over features) or 1 - cosine averaged over positions where mask = 1,
    or -I_alpha over those positions (``mi_alpha``)."""
    s, t = student.float(), teacher.detach().float()
    if objective.hidden_loss == "mi_alpha":
        keep = mask.bool()
        scores = gaussian_critic(s[keep], t[keep], objective.mi_temperature)
        return -losses.mi_alpha_bound(scores, objective.mi_alpha)
    if objective.hidden_loss == "mse":
        per_position = (s - t).pow(2).mean(-1)
    else:
        per_position = 1 - F.cosine_similarity(s, t, dim=-1)
    m = mask.to(per_position.dtype)
    return (per_position * m).sum() / m.sum().clamp_min(1.0)


def gaussian_critic(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``S[i, k] = -||student_k - teacher_i||^2 / (D * tau * v)`` for ``[N, D]`` features, v the mean
    per-feature variance of the teacher's (MI-alpha's critic, module docstring)."""
    sq = (teacher * teacher).sum(-1)[:, None] + (student * student).sum(-1)[None, :] - 2 * teacher @ student.T
    scale = teacher.shape[-1] * temperature * teacher.var(dim=0, unbiased=False).mean().clamp_min(1e-12)
    return -sq.clamp_min(0.0) / scale


def features(model, inputs, keys: list[int | str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The model's logits and the hidden states named by ``keys`` (indices or module paths)."""
    paths = [k for k in keys if isinstance(k, str)]
    with _capture(model, paths) as captured:
        out = model(**inputs, output_hidden_states=any(isinstance(k, int) for k in keys))
    states = out.hidden_states
    picked = []
    for key in keys:
        if isinstance(key, str):
            picked.append(captured[key])
            continue
        if not -len(states) <= key < len(states):
            raise StillroomError(
                f"hidden-state index {key} is out of range for {type(model).__name__} ({len(states)} states)",
                f"use 0..{len(states) - 1} in method.pairs",
            )
        picked.append(states[key])
    return out.logits, picked


@contextmanager
def _capture(model, paths: list[str]):
    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for path in paths:
        if path not in modules:
            raise StillroomError(
                f"module path '{path}' is not in {type(model).__name__}",
                "use a name from model.named_modules(), e.g. model.layers.0",
            )

        def hook(_module, _args, output, _path=path):
            captured[_path] = output[0] if isinstance(output, tuple) else output

        handles.append(modules[path].register_forward_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
