"""KD3's dynamic instance selection (Tang, Chen, Niu, Sugiyama & Gong, ICCV 2023, "Distribution Shift
Matters for Knowledge Distillation with Webly Collected Images", arXiv:2307.11469).

The pool is collected from elsewhere (the web; here: digits of another dataset and shifted digits),
so many of its examples lie off the distribution the teacher was trained on, and the teacher's outputs
on them teach the student little or wrong things. KD3 keeps the examples on which the teacher and the
student, combining their predictions, agree with confidence, and selects again as the student learns
("dynamic": every ``every`` steps). With p_t(x), p_s(x) the two networks' class probabilities:

    p(x)    = (1 - beta) p_t(x) + beta p_s(x)                  combined prediction
    keep x  iff  argmax p_t(x) = argmax p_s(x)  and  max_c p(x)_c >= tau
    w(x)    = max_c p(x)_c                                     (``weighted``: the example's weight)

and, at a ``budget``, the kept examples of highest confidence max_c p(x)_c. The mixture with beta,
the agreement test and the threshold tau are how this file makes "the combined predictions of the
teacher and the student" concrete; the paper's own weighting of the two may differ. At step 0 the student is
untrained and its vote is noise, so the first selection reads the teacher alone (p = p_t, no agreement
test). When nothing passes, the previous selection stays; a first selection that keeps nothing is an
error that says to lower ``tau``.

MixDistribution (``mix`` > 0), KD3's perturbation of the data towards a new distribution: a further
round(mix * |selection|) examples, each a selected example x_i with the per-channel statistics of its
input mixed with those of x_j, an example of the most confident quarter of the selection (the most
like the teacher's own distribution):

    mu = lam mu(x_i) + (1 - lam) mu(x_j),   sigma = lam sigma(x_i) + (1 - lam) sigma(x_j),
    x' = sigma (x_i - mu(x_i)) / sigma(x_i) + mu,          lam ~ Beta(alpha_mix, alpha_mix)

The method makes x' (for images: per-channel mean and standard deviation over the pixels) and the
teacher labels it. KD3 mixes the statistics of intermediate feature maps inside the student and adds
a contrastive alignment between the original and the perturbed instance; a data selector can only
change the data, so here the mixing is on the input and the perturbed examples are trained on with
the method's own loss. KD3's weighted feature and classifier alignment are parts of its training loss
and not implemented here.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from stillroom.core.errors import StillroomError
from stillroom.core.selection import Pool, Selection, Selector, SelectorParams


class KD3Params(SelectorParams):
    every: int = Field(100, ge=0, description="steps between selections (the dynamic selection)")
    tau: float = Field(0.9, gt=0, le=1, description="confidence the combined prediction must reach")
    beta: float = Field(0.5, ge=0, le=1, description="weight of the student in the combined prediction")
    budget: int | None = Field(None, gt=0, description="at most this many examples, the most confident")
    weighted: bool = Field(True, description="weight each kept example by its combined confidence")
    mix: float = Field(0.0, ge=0, le=1, description="MixDistribution: mixed copies per selected example")
    alpha_mix: float = Field(0.1, gt=0, description="lam ~ Beta(alpha_mix, alpha_mix)")


def combined(p_t: np.ndarray, p_s: np.ndarray | None, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """(confidence max_c p(x)_c, agreement) of the combined prediction; without a student, p = p_t."""
    if p_s is None:
        return p_t.max(1), np.ones(len(p_t), dtype=bool)
    p = (1 - beta) * p_t + beta * p_s
    return p.max(1), p_t.argmax(1) == p_s.argmax(1)


class KD3(Selector):
    name = "kd3"
    description = (
        "examples whose teacher and student predictions agree with confidence, re-selected as it learns"
    )
    paper = (
        "Tang et al. 2023, Distribution Shift Matters for Knowledge Distillation with Webly Collected Images"
    )
    Params = KD3Params

    def select(self, pool: Pool, step: int, steps: int, previous: Selection | None) -> Selection:
        p = self.params
        index = np.arange(pool.size)
        p_s = pool.predict("student", index) if step > 0 else None
        confidence, agree = combined(pool.predict("teacher", index), p_s, p.beta)
        kept = np.flatnonzero(agree & (confidence >= p.tau))
        if not len(kept):
            if previous is not None:
                return previous
            raise StillroomError(
                f"kd3: no example of the pool reaches confidence {p.tau}",
                "lower data.select.tau",
            )
        kept = kept[np.argsort(-confidence[kept], kind="stable")][: p.budget]
        return Selection(kept, confidence[kept] if p.weighted else None, self.mixes(kept, step))

    def mixes(self, kept: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(i, j, lam) of the MixDistribution examples; ``kept`` is ordered by confidence."""
        count = round(self.params.mix * len(kept))
        if not count:
            return None
        rng = self.rng(step)
        confident = kept[: max(1, len(kept) // 4)]
        first, second = rng.choice(kept, size=count), rng.choice(confident, size=count)
        return first, second, rng.beta(self.params.alpha_mix, self.params.alpha_mix, size=count)
