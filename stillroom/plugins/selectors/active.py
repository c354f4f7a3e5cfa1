"""Robust active distillation (Baykal, Trinh, Iliopoulos, Menghani & Vee, ICLR 2023, "Robust Active
Distillation", arXiv:2210.01213): which unlabelled examples to spend a ``budget`` of teacher queries
on.

The examples the student is least sure of teach it most, but they are also where the teacher errs
most. With the student's margin m(x) = p_s(x)_(1) - p_s(x)_(2) (its two largest probabilities), the
gain of querying x is g(x) = 1 - m(x). The learner queries x with probability p(x) (sum_x p(x) = Q, the
queries of this round); an adversary, the teacher's mistakes, spoils up to k queried examples, taking
those worth most. The learner maximises what is left:

    max_p  min_{m in [0,1]^N, sum m <= k}  sum_x p(x) g(x) (1 - m(x))
         = max_p  [ sum_x v(x) - (sum of the k largest v(x)) ],     v(x) = p(x) g(x)

Spending budget beyond the level of the k largest values earns nothing (the adversary takes it), so
at the optimum every v is capped by one level lambda, the k largest sit at lambda, and the queries go
to the examples of largest gain first (each unit of v(x) costs 1 / g(x) of the budget):

    v(x) = min(g(x), lambda) along g_(1) >= g_(2) >= ... until sum_x p(x) = Q   (the last one in part)
    lambda = argmax_lambda  sum_x v_lambda(x) - k lambda                   (concave: ternary search)
    p(x) = v(x) / g(x)     <= 1

(``robust_distribution``). The round queries Q examples: those with p(x) = 1, then the rest drawn
without replacement in proportion to p(x). k = ``mistake_rate`` * Q is the adversary's budget (a
parameter here). The paper's game is written out above as this file reads it; the margin gain and the
solution by a level lambda are this file's concrete choices, checked against a linear-programme
solution of the same max-min problem in the tests. k = 0 gives plain margin sampling (the Q largest
gains); a larger k spreads the queries over more, less uncertain examples, at lambda / g(x) each.

Rounds: with ``every`` > 0 the trainer selects every ``every`` steps; round r brings the queries made
to round((r + 1) budget / rounds) and the run trains on every example queried so far. The first round,
before the student has learnt anything, draws uniformly (its margins are noise). The teacher is read
only on the examples queried: the run never spends more than ``budget`` queries.
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import Field

from stillroom.core.selection import Pool, Selection, Selector, SelectorParams


class ActiveParams(SelectorParams):
    budget: int = Field(gt=0, description="teacher queries the whole run may spend (examples)")
    mistake_rate: float = Field(
        0.1, ge=0, lt=1, description="share of queried examples the teacher gets wrong"
    )


def margin_gain(probs: np.ndarray) -> np.ndarray:
    """g(x) = 1 - (largest - second largest probability), floored away from 0."""
    top2 = np.sort(probs, axis=1)[:, -2:]
    return np.maximum(1 - (top2[:, 1] - top2[:, 0]), 1e-12)


def robust_distribution(gains: np.ndarray, queries: int, mistakes: float) -> np.ndarray:
    """p(x) of the max-min problem above (sum p = Q, 0 <= p <= 1)."""
    order = np.argsort(-gains, kind="stable")
    g = gains[order]

    def spend(level: float) -> tuple[np.ndarray, float]:
        cost = np.minimum(1.0, level / g)  # p of each example at this level, largest gain first
        before = np.concatenate([[0.0], np.cumsum(cost)[:-1]])
        p = np.clip(queries - before, 0.0, cost)
        return p, float((p * g).sum() - mistakes * level)

    low, high = 0.0, float(g[0])  # bisect for the smallest level that can spend Q queries
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if np.minimum(1.0, mid / g).sum() < queries else (low, mid)
    low, high = high, float(g[0])
    for _ in range(200):  # the value is concave in the level
        a, b = low + (high - low) / 3, high - (high - low) / 3
        low, high = (a, high) if spend(a)[1] < spend(b)[1] else (low, b)
    p = np.zeros(len(gains))
    p[order] = spend((low + high) / 2)[0]
    return p


class RobustActive(Selector):
    name = "active"
    description = (
        "spends a budget of teacher queries on informative examples, robust to the teacher's mistakes"
    )
    paper = "Baykal et al. 2023, Robust Active Distillation (ICLR)"
    Params = ActiveParams

    def select(self, pool: Pool, step: int, steps: int, previous: Selection | None) -> Selection:
        p = self.params
        rounds = math.ceil(steps / p.every) if p.every else 1
        done = previous.indices if previous is not None else np.zeros(0, dtype=np.int64)
        round_ = step // p.every + 1 if p.every else 1
        target = min(max(1, round(round_ * p.budget / rounds)), p.budget, pool.size)
        queries = target - len(done)
        if queries <= 0:
            return previous
        rng = self.rng(step)
        candidates = np.setdiff1d(np.arange(pool.size), done)
        if previous is None:
            new = rng.choice(candidates, size=queries, replace=False)
        else:
            gains = margin_gain(pool.predict("student", candidates))
            prob = robust_distribution(gains, queries, p.mistake_rate * queries)
            sure = candidates[prob >= 1 - 1e-6]
            rest, weight = candidates[prob < 1 - 1e-6], prob[prob < 1 - 1e-6]
            drawn = rng.choice(rest, size=queries - len(sure), replace=False, p=weight / weight.sum())
            new = np.concatenate([sure, drawn])
        return Selection(np.concatenate([done, np.sort(new)]))
