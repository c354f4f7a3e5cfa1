"""KD on a pruned training set (Ben-Baruch, Botach, Kviatkovsky, Aggarwal & Medioni 2024, ICML 2025,
"Distilling the Knowledge in Data Pruning").

Keep a fraction f (``keep``) of the labelled training set, ranked by a pruning score, and train on it
with the teacher's soft targets as well as the labels:

    L = alpha(f) * L_KD + (1 - alpha(f)) * L_CE

Scores (``score``):
- ``random``: a uniform subset; the paper's finding is that with KD it matches or beats the
  sophisticated scores at every pruning fraction;
- ``el2n``: the error L2-norm (Paul et al. 2021), EL2N(x, y) = || p(x) - onehot(y) ||_2, keeping the
  largest (``prefer: hard``) or the smallest (``easy``; better at small f, as the paper observes). p is
  the teacher's prediction: the network trained on the full data that KD needs anyway (Paul et al.
  average early-training checkpoints, which a distillation run does not have).

Adaptive weight (``adaptive``): the fewer examples are kept, the more the student should rely on the
teacher rather than on the labels of the few (and noisy) examples left, so the KD weight grows as f
shrinks. This file uses the line from ``alpha_full`` at f = 1 to 1 at f -> 0:

    alpha(f) = 1 - (1 - alpha_full) f

and writes it into the method's teacher weight (``classifier_kd``'s ``alpha``) when the recipe is
validated. The paper shows the optimal weight rising as f falls; the linear form is this file's choice.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from stillroom.core.errors import StillroomError
from stillroom.core.selection import Pool, Selection, Selector, SelectorParams


class PruneKDParams(SelectorParams):
    every: int = Field(0, ge=0, le=0, description="pruning happens once, before training")
    keep: float = Field(0.5, gt=0, le=1, description="f: the fraction of the training set kept")
    score: Literal["random", "el2n"] = Field("random", description="how examples are ranked")
    prefer: Literal["hard", "easy"] = Field("hard", description="el2n: keep the largest or the smallest")
    adaptive: bool = Field(True, description="set the method's KD weight to alpha(f)")
    alpha_full: float = Field(0.5, ge=0, le=1, description="the KD weight alpha(1) with the full data")


def el2n(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """|| p(x) - onehot(y) ||_2 per example."""
    onehot = np.eye(probs.shape[1])[labels]
    return np.linalg.norm(probs - onehot, axis=1)


def adaptive_alpha(keep: float, alpha_full: float) -> float:
    """alpha(f) = 1 - (1 - alpha_full) f."""
    return 1 - (1 - alpha_full) * keep


class PruneKD(Selector):
    name = "prune_kd"
    description = "keeps a fraction of the data (random or EL2N) and weights KD by the fraction kept"
    paper = "Ben-Baruch et al. 2024, Distilling the Knowledge in Data Pruning"
    Params = PruneKDParams

    @classmethod
    def teacher_weight(cls, params: PruneKDParams) -> float | None:
        return adaptive_alpha(params.keep, params.alpha_full) if params.adaptive else None

    def select(self, pool: Pool, step: int, steps: int, previous: Selection | None) -> Selection:
        p = self.params
        size = max(1, round(p.keep * pool.size))
        if p.score == "random":
            return Selection(np.sort(self.rng(step).choice(pool.size, size=size, replace=False)))
        index = np.arange(pool.size)
        labels = pool.labels(index)
        if labels is None:
            raise StillroomError(
                "prune_kd: score el2n needs labels, and the pool has none", "use score: random"
            )
        scores = el2n(pool.predict("teacher", index), labels)
        order = np.argsort(-scores if p.prefer == "hard" else scores, kind="stable")
        return Selection(np.sort(order[:size]))
