"""AutoDistil: one weight-sharing super-student, trained once, ranks every candidate shape.

"AutoDistil: Few-shot Task-agnostic Neural Architecture Search for Distilling Large Language Models"
(Xu et al. 2022). The super-student holds every candidate of the grid: the largest depth, hidden
size, head count, key/value heads, head width and MLP width. A candidate (l, d, h, kv, i; head width
d/h) is its leading slice, so all candidates share one set of weights:

    blocks 0 .. l-1, and in every block and embedding the leading rows / columns
    E[:, :d]   g[:d] (RMSNorm gains)   W_gate, W_up -> [:i, :d]   W_down -> [:d, :i]
    W_q as [H, hd, D] -> [:h, :d/h, :d]   W_k, W_v as [KV, hd, D] -> [:kv, :d/h, :d]
    W_o as [D, H, hd] -> [:d, :h, :d/h]

A sub-network's forward runs the super-student's own tensors (``torch.func.functional_call`` on a
skeleton of the candidate's shape), so its gradient lands in the shared slice. Task-agnostic
distillation trains the super-student once with the sandwich rule (each step: the largest, the
smallest and ``k`` random candidates) and MiniLMv2's self-attention relation loss (Wang et al.
2021) at the last block, which compares relations of any width:

    R^X = softmax(X X^T / sqrt(d_X)) over causal pairs,   X in {Q, K, V}  (last block's projections)
    L = 1/3 sum_X mean_rows KL(R^X_teacher || R^X_student)

Each candidate is then ranked by that loss on the probe batch with the shared weights (score =
-loss, higher is better); the best within the latency limit is extracted (its slice copied into a
plain transformers model) and distilled from there with the recipe. One relation head per
projection (MiniLMv2 splits them into several).
"""

from __future__ import annotations

import logging
import math
import random
import re
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from stillroom.core.errors import StillroomError
from stillroom.plugins.lm import models
from stillroom.plugins.lm.student_search.candidates import Candidate

log = logging.getLogger(__name__)
MASKED = -1e9


def super_shape(shapes: list[Candidate]) -> dict[str, int]:
    """Config overrides of the super-student: every dimension at its largest over ``shapes``."""
    return {
        "num_hidden_layers": max(c.layers for c in shapes),
        "hidden_size": max(c.hidden for c in shapes),
        "num_attention_heads": max(c.heads for c in shapes),
        "num_key_value_heads": max(c.kv_heads for c in shapes),
        "head_dim": max(c.hidden // c.heads for c in shapes),
        "intermediate_size": max(c.intermediate for c in shapes),
    }


def slice_weight(name: str, w: torch.Tensor, shape: Candidate, config) -> torch.Tensor:
    """The candidate's part of the super-student weight ``name``: a view, or (where narrower heads
    need a reshape) a differentiable gather, so the sub-network's gradient lands in the shared weight."""
    d, h, kv, i, hd = (
        shape.hidden,
        shape.heads,
        shape.kv_heads,
        shape.intermediate,
        shape.hidden // shape.heads,
    )
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        return w[:, :d]
    if name.endswith("norm.weight"):
        return w[:d]
    if name.endswith("q_proj.weight"):
        return w.view(heads, head_dim, -1)[:h, :hd, :d].reshape(h * hd, d)
    if name.endswith(("k_proj.weight", "v_proj.weight")):
        return w.view(kv_heads, head_dim, -1)[:kv, :hd, :d].reshape(kv * hd, d)
    if name.endswith("o_proj.weight"):
        return w.view(-1, heads, head_dim)[:d, :h, :hd].reshape(d, h * hd)
    if name.endswith(("gate_proj.weight", "up_proj.weight")):
        return w[:i, :d]
    if name.endswith("down_proj.weight"):
        return w[:d, :i]
    raise StillroomError(
        f"autodistil cannot slice the super-student weight '{name}'", "use a Llama-family teacher"
    )


def sub_weights(super_model, shape: Candidate) -> dict[str, torch.Tensor]:
    """``{name: slice}`` of every super-student weight the candidate uses (blocks 0 .. l-1)."""
    out = {}
    for name, w in super_model.named_parameters():
        block = re.search(r"\.layers\.(\d+)\.", name)
        if block is None or int(block.group(1)) < shape.layers:
            out[name] = slice_weight(name, w, shape, super_model.config)
    return out


class SuperStudent:
    """The super-student and one skeleton per candidate shape (whose own weights are never used)."""

    def __init__(self, teacher, shapes: list[Candidate], seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = models.student_from_teacher_config(teacher, super_shape(shapes))
        self.teacher = teacher
        self._skeletons: dict[Candidate, torch.nn.Module] = {}

    def skeleton(self, shape: Candidate):
        if shape not in self._skeletons:
            self._skeletons[shape] = models.student_from_teacher_config(self.teacher, shape.overrides())
        return self._skeletons[shape]

    def forward(self, shape: Candidate, ids: torch.Tensor):
        """The candidate's forward on the shared weights; returns (logits, last block's Q, K, V)."""
        skeleton = self.skeleton(shape)
        with _projections(skeleton) as qkv:
            out = torch.func.functional_call(skeleton, sub_weights(self.model, shape), (), {"input_ids": ids})
        return out.logits, qkv

    def extract(self, shape: Candidate):
        """A plain transformers model of the candidate holding a copy of its slice."""
        model = models.student_from_teacher_config(self.teacher, shape.overrides())
        weights = sub_weights(self.model, shape)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(weights[name])
        return model


@contextmanager
def _projections(model):
    """Captures the outputs of the last block's q/k/v projections."""
    attn = models.decoder_layers(model)[-1].self_attn
    captured: list[torch.Tensor] = [None, None, None]
    handles = [
        module.register_forward_hook(lambda _m, _a, out, _i=i: captured.__setitem__(_i, out))
        for i, module in enumerate((attn.q_proj, attn.k_proj, attn.v_proj))
    ]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def log_relations(x: torch.Tensor) -> torch.Tensor:
    """log softmax(X X^T / sqrt(d)) over causal pairs (j <= i), [B, L, L]."""
    scores = x.float() @ x.float().transpose(-1, -2) / math.sqrt(x.shape[-1])
    future = torch.ones(scores.shape[-2:], dtype=torch.bool, device=x.device).triu(1)
    return scores.masked_fill(future, MASKED).log_softmax(-1)


def relation_loss(teacher_qkv: list[torch.Tensor], student_qkv: list[torch.Tensor]) -> torch.Tensor:
    """1/3 sum over Q, K, V of the mean over rows of KL(R_teacher || R_student)."""
    total = 0.0
    for t, s in zip(teacher_qkv, student_qkv, strict=True):
        log_t, log_s = log_relations(t.detach()), log_relations(s)
        total = total + F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1).mean()
    return total / 3


def teacher_relations(teacher, ids: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad(), _projections(teacher) as qkv:
        teacher(input_ids=ids)
    return list(qkv)


def train(
    sup: SuperStudent,
    shapes: list[Candidate],
    blocks: torch.Tensor,
    steps: int,
    batch: int,
    lr: float,
    k: int = 2,
    seed: int = 0,
) -> list[float]:
    """Sandwich-rule task-agnostic distillation of the super-student; returns the loss per step."""
    by_size = sorted(shapes, key=lambda c: sum(p.numel() for p in sub_weights(sup.model, c).values()))
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(sup.model.parameters(), lr=lr)
    history = []
    sup.model.train()
    for step in range(steps):
        ids = blocks[torch.randint(0, blocks.shape[0], (batch,), generator=gen)]
        reference = teacher_relations(sup.teacher, ids)
        sampled = [by_size[-1], by_size[0], *rng.sample(by_size, min(k, len(by_size)))]
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for shape in sampled:
            loss = relation_loss(reference, sup.forward(shape, ids)[1]) / len(sampled)
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(sup.model.parameters(), 1.0)
        opt.step()
        history.append(total)
        if (step + 1) % 25 == 0:
            log.info("super-student step %d/%d: relation loss %.4f", step + 1, steps, total)
    sup.model.eval()
    return history


@torch.no_grad()
def scores(
    sup: SuperStudent, shapes: list[Candidate], probe: torch.Tensor
) -> dict[Candidate, dict[str, float]]:
    """Every candidate's relation loss on ``probe`` with the shared weights; score = -loss."""
    reference = teacher_relations(sup.teacher, probe)
    out = {}
    for shape in shapes:
        loss = float(relation_loss(reference, sup.forward(shape, probe)[1]))
        out[shape] = {"score": -loss, "relation_loss": loss}
    return out
