"""DisWOT: a training-free score of a randomly initialised student against a trained teacher.

"DisWOT: Student Architecture Search for Distillation WithOut Training" (Dong et al., CVPR 2023):
students whose *feature relations* already resemble the teacher's at initialisation distil better.
On one probe batch of N tokens, with F in R^{N x d} the final-layer features (after the last norm)
and W the vocabulary head, the score compares two Gram matrices, each row L2-normalised as in
Similarity-Preserving KD (Tung & Mori 2019), whose relation Grams DisWOT builds on:

    Gram(X) = row_normalise(X X^T),       row_normalise(G)_i = G_i / ||G_i||_2

    semantic (class) similarity: Grad-CAM maps of the C classes over the N positions,
        A_c,n = ReLU( sum_k alpha^c_k F_n,k ),   alpha^c_k = d y_c / d F_n,k = W_c,k
        (the head is linear on the last features, so Grad-CAM is ReLU(logits): A = ReLU(Z)^T)
        D_sem = || Gram(A_teacher) - Gram(A_student) ||_F          (C x C)

    sample-relation similarity: the batch Gram of the features, one sample per token
        D_rel = || Gram(F_teacher) - Gram(F_student) ||_F          (N x N)

    DisWOT(student) = -(D_sem + D_rel)                 higher is better; 0 for the teacher itself

The C classes are the tokens that occur as next-token targets in the probe batch, most frequent
first (``classes`` of them): a vocabulary-sized C x C Gram would be dominated by tokens the batch
never exercises. Both Grams are width-free (C x C and N x N), so students of any hidden size
compare with the teacher directly, without a projection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def gram(x: torch.Tensor) -> torch.Tensor:
    """Row-normalised Gram matrix ``normalize(x x^T)`` of ``x`` [M, K], in float64."""
    x = x.double()
    return F.normalize(x @ x.T, dim=1)


@dataclass
class Features:
    """What DisWOT reads from one model on the probe batch: [N, d] features and [N, C] class logits."""

    features: torch.Tensor
    class_logits: torch.Tensor


def semantic_distance(teacher: Features, student: Features) -> float:
    """D_sem: distance of the class Grams of the Grad-CAM maps A = ReLU(Z)^T."""
    return float(torch.linalg.norm(gram(teacher.class_logits.relu().T) - gram(student.class_logits.relu().T)))


def relation_distance(teacher: Features, student: Features) -> float:
    """D_rel: distance of the sample (token) Grams of the features."""
    return float(torch.linalg.norm(gram(teacher.features) - gram(student.features)))


def score(teacher: Features, student: Features) -> dict[str, float]:
    """``{"score", "semantic", "relation"}``: -(D_sem + D_rel) and its two distances."""
    sem, rel = semantic_distance(teacher, student), relation_distance(teacher, student)
    return {"score": -(sem + rel), "semantic": sem, "relation": rel}


def probe_classes(ids: torch.Tensor, classes: int) -> torch.Tensor:
    """The ``classes`` most frequent next-token targets of ``ids`` [B, L] (ties: lower id first)."""
    values, counts = ids[:, 1:].reshape(-1).unique(return_counts=True)
    order = sorted(range(len(values)), key=lambda i: (-int(counts[i]), int(values[i])))
    return values[order[:classes]]


@torch.no_grad()
def features(model, ids: torch.Tensor, classes: torch.Tensor) -> Features:
    """Final-norm features and the logits of ``classes`` at every position of ``ids`` but the last."""
    out = model(input_ids=ids, output_hidden_states=True)
    feats = out.hidden_states[-1][:, :-1]
    logits = out.logits[:, :-1, classes]
    return Features(feats.reshape(-1, feats.shape[-1]).float(), logits.reshape(-1, len(classes)).float())
