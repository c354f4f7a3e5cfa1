"""Next-token choice: greedy, temperature and nucleus (top-p) sampling, one row at a time.

Temperature sampling draws from softmax(z / T); T = 0 means greedy (argmax z). Nucleus sampling
("The Curious Case of Neural Text Degeneration", Holtzman et al. 2020) keeps the smallest set of
tokens V_p whose probabilities sum to at least p,

    V_p = argmin |V'|  s.t.  sum_{x in V'} P(x | x_<t) >= p,

renormalises P over V_p and samples from it. Probabilities are computed in float64 so that rows
with large logits stay exact.

Before either, OpenAI's presence and frequency penalties adjust the logits of tokens the row has
already generated (``penalize``; c_j counts token j in the row's output so far):

    z_j <- z_j - c_j * frequency_penalty - [c_j > 0] * presence_penalty

and ``logprobs`` reports log-softmax of those adjusted logits (at temperature 1, before top-p): the
model's own distribution as the request shaped it, not the truncated one a draw came from.

Two implementations of the same distribution, on purpose: ``nucleus_candidates`` is what generation
draws from and needs only the nucleus (candidates come from ``argpartition``, O(V); only if their
mass falls short of p is the candidate set widened, so the vocabulary is sorted at most once and
usually never); ``nucleus_probs`` is the plain definition (sort everything, cut, renormalise) that the
tests hold it to.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class SamplingParams:
    """How one row of a batch picks its tokens and when it stops."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)
    ignore_eos: bool = False
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # report the chosen token's logprob and the top ``logprobs`` others

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if not (-2 <= self.presence_penalty <= 2 and -2 <= self.frequency_penalty <= 2):
            raise ValueError("presence_penalty and frequency_penalty must be in [-2, 2]")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError("logprobs must be in [0, 20]")


def penalize(logits: np.ndarray, generated: list[int], params: SamplingParams) -> np.ndarray:
    """The row's logits with OpenAI's presence / frequency penalties for its ``generated`` tokens."""
    if not params.penalized or not generated:
        return logits
    ids, counts = np.unique(np.asarray(generated, dtype=np.int64), return_counts=True)
    out = logits.astype(np.float64, copy=True)
    out[ids] -= counts * params.frequency_penalty + params.presence_penalty
    return out


def top_logprobs(logits: np.ndarray, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """(log p(token), the k most likely (id, log p) pairs, most likely first) under softmax(logits)."""
    z = logits.astype(np.float64)
    logp = z - z.max()
    logp -= np.log(np.exp(logp).sum())
    top = np.argpartition(-logp, k - 1)[:k] if 0 < k < logp.shape[0] else np.arange(logp.shape[0])[:k]
    top = top[np.argsort(-logp[top], kind="stable")]
    return float(logp[token]), [(int(i), float(logp[i])) for i in top]


def nucleus_probs(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """The distribution a row samples from: softmax(logits / T) restricted to the top-p nucleus."""
    z = logits.astype(np.float64) / temperature
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cumulative = np.cumsum(p[order])
        keep = int(np.searchsorted(cumulative, top_p, side="left")) + 1  # smallest prefix reaching p
        mask = np.zeros_like(p, dtype=bool)
        mask[order[:keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return p


def nucleus_candidates(logits: np.ndarray, temperature: float, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, probabilities) of the top-p nucleus of softmax(logits / T), probabilities renormalised.

    Candidates are the k largest probabilities (``argpartition``); the nucleus lies inside them once
    their mass (softmax over the whole row) reaches p; otherwise k grows fourfold.
    """
    z = logits.astype(np.float64) / temperature
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    if top_p >= 1.0:
        return np.arange(p.shape[0]), p
    vocab, k = p.shape[0], 64
    while True:
        k = min(k, vocab)
        top = np.argpartition(-p, k - 1)[:k] if k < vocab else np.arange(vocab)
        order = top[np.argsort(-p[top], kind="stable")]
        cumulative = np.cumsum(p[order])
        if cumulative[-1] >= top_p or k == vocab:
            keep = int(np.searchsorted(cumulative, top_p, side="left")) + 1
            ids = order[: min(keep, k)]
            probs = p[ids]
            return ids, probs / probs.sum()
        k *= 4


def choose_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token id from a row of logits [V]: argmax when T = 0, else a draw from the nucleus."""
    if params.temperature == 0.0:
        return int(np.argmax(logits))
    ids, probs = nucleus_candidates(logits, params.temperature, params.top_p)
    cdf = np.cumsum(probs)  # inverse-CDF draw: the first candidate whose cumulative mass exceeds u
    return int(ids[min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), len(ids) - 1)])
