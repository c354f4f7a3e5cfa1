"""Divergences between a student's and a teacher's next-token distributions.

Every function takes ``student_logits`` and ``teacher_logits`` of shape ``[B, L, V]`` or ``[N, V]``,
an optional ``mask`` (``[B, L]`` or ``[N]``; 1 = position counts, label -100 positions are 0) and
returns a 0-dim tensor: the per-position divergence averaged over counted positions. Teacher logits
are detached, so gradients reach the student only. Computation is in float32 (log-softmax) whatever
the input dtype.

``p`` is the teacher's distribution, ``q`` the student's, both softened by ``temperature`` T:
``p = softmax(z_teacher / T)``, ``q = softmax(z_student / T)``. Every divergence is multiplied by
T^2 (Hinton et al. 2015), so that changing T leaves the size of the distillation gradient roughly
unchanged and the limiting cases below hold at any T.

The functions accept anything whose ``log_softmax`` is the distribution meant, so the top-k teacher
cache (``topk.py``) passes ``T * log p`` over its k+1 bins and reuses them unchanged.

``mi_alpha_bound`` is the odd one out: a mutual-information lower bound on a matrix of critic scores
between two sets of representations (hidden-state distillation's ``mi_alpha`` objective, ``hidden.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _masked_mean(per_position: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return per_position.mean()
    mask = mask.to(per_position.dtype).reshape(per_position.shape)
    return (per_position * mask).sum() / mask.sum().clamp_min(1.0)


def _log_probs(student_logits, teacher_logits, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return log_q, log_p


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Per-position KL(a || b) = sum_v a(v) [log a(v) - log b(v)], with 0 log 0 = 0."""
    a = log_a.exp()
    diff = torch.where(a > 0, log_a - log_b, torch.zeros_like(a))  # keeps backward free of 0 * inf
    return (a * diff).sum(-1)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w * a + (1 - w) * b) computed in log space (no underflow for tiny probabilities)."""
    if w <= 0.0:
        return log_b
    if w >= 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


def forward_kl(student_logits, teacher_logits, mask=None, temperature: float = 1.0) -> torch.Tensor:
    """Hinton et al. 2015, "Distilling the Knowledge in a Neural Network":

        L = T^2 * KL(p || q) = T^2 * sum_v p(v) [log p(v) - log q(v)].

    Mode-covering: the student is pushed to put mass wherever the teacher does.
    """
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature)
    return temperature**2 * _masked_mean(_kl(log_p, log_q), mask)


def reverse_kl(student_logits, teacher_logits, mask=None, temperature: float = 1.0) -> torch.Tensor:
    """Reverse KL (MiniLLM, Gu et al. 2024, "MiniLLM: Knowledge Distillation of Large Language Models"):

        L = T^2 * KL(q || p) = T^2 * sum_v q(v) [log q(v) - log p(v)].

    Mode-seeking: a small student concentrates on the teacher's main modes instead of smearing.
    """
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature)
    return temperature**2 * _masked_mean(_kl(log_q, log_p), mask)


def generalized_jsd(
    student_logits, teacher_logits, mask=None, temperature: float = 1.0, beta: float = 0.5
) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence (GKD, Agarwal et al. 2024, "On-Policy Distillation of
    Language Models: Learning from Self-Generated Mistakes"):

        JSD(beta)(p || q) = beta * KL(p || m) + (1 - beta) * KL(q || m),   m = beta * p + (1 - beta) * q,

    with m formed in log space (logaddexp). JSD(beta)/beta -> KL(p||q) as beta -> 0 and
    JSD(beta)/(1-beta) -> KL(q||p) as beta -> 1, so the end points are defined as those limits (as in
    the paper's experiments and TRL's GKDTrainer): beta = 0 is exactly forward KL, beta = 1 exactly
    reverse KL.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, mask, temperature)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, mask, temperature)
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature)
    log_m = _log_mix(log_p, log_q, beta)
    per_position = beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    return temperature**2 * _masked_mean(per_position, mask)


def skew_forward_kl(
    student_logits, teacher_logits, mask=None, temperature: float = 1.0, alpha: float = 0.1
) -> torch.Tensor:
    """Skew KL (DistiLLM, Ko et al. 2024, "DistiLLM: Towards Streamlined Distillation for LLMs"):

        SKL(alpha)(p || q) = KL(p || alpha * p + (1 - alpha) * q).

    Mixing a little of p into the second argument bounds the divergence (by log 1/alpha) and its
    gradient where q is near zero; alpha = 0 is forward KL. Gradients flow through q in the mixture.
    """
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature)
    return temperature**2 * _masked_mean(_kl(log_p, _log_mix(log_p, log_q, alpha)), mask)


def skew_reverse_kl(
    student_logits, teacher_logits, mask=None, temperature: float = 1.0, alpha: float = 0.1
) -> torch.Tensor:
    """Skew reverse KL (DistiLLM, Ko et al. 2024):

        SRKL(alpha)(q || p) = KL(q || (1 - alpha) * p + alpha * q);

    alpha = 0 is reverse KL.
    """
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature)
    return temperature**2 * _masked_mean(_kl(log_q, _log_mix(log_q, log_p, alpha)), mask)


def total_variation(student_logits, teacher_logits, mask=None, temperature: float = 1.0) -> torch.Tensor:
    """Total variation distance (used for LM distillation by Wen et al. 2023, "f-Divergence
    Minimization for Sequence-Level Knowledge Distillation"):

        TVD(p, q) = 1/2 * sum_v |p(v) - q(v)|   (times T^2 like the others).
    """
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature)
    per_position = 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    return temperature**2 * _masked_mean(per_position, mask)


def taid_loss(student_logits, teacher_logits, t: float, mask=None) -> torch.Tensor:
    """TAID (Shing et al. 2025, "TAID: Temporally Adaptive Interpolated Distillation for Efficient
    Knowledge Transfer in Language Models"), eq. 3-4: the target interpolates the logits of the
    (stop-gradient) student and the teacher,

        p_t = softmax((1 - t) * sg(z_student) + t * z_teacher),   L = KL(p_t || q_student).

    t = 0: the target is the student itself (zero loss); t = 1: plain forward KL to the teacher.
    """
    target = (1.0 - t) * student_logits.detach().float() + t * teacher_logits.detach().float()
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    log_pt = F.log_softmax(target, dim=-1)
    return _masked_mean(_kl(log_pt, log_q), mask)


def sinkhorn_loss(
    student_logits,
    teacher_logits,
    epsilon: float = 0.1,
    iters: int = 20,
    temperature: float = 1.0,
    *,
    mask=None,
) -> torch.Tensor:
    """SinKD (Cui et al. 2024, "SinKD: Sinkhorn Distance Minimization for Knowledge Distillation"):
    the batch-wise Sinkhorn distance between the set of teacher distributions {p_i} and the set of
    student distributions {q_j} of the N counted positions:

        C_ij = ||p_i - q_j||_1,    K = exp(-C / epsilon),
        P = diag(a) K diag(b)  with  a = mu / (K b),  b = nu / (K^T a)  iterated ``iters`` times,
        mu = nu = 1/N,         L = sum_ij P_ij C_ij.

    The iterations run in log space (log-sum-exp), so small epsilon does not underflow; gradients
    flow through C and the iterations into the student. Unlike a per-position divergence this
    compares the geometry of the whole batch of distributions. The cost matrix is N x N: callers
    subsample positions for long batches.
    """
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature)
    q = log_q.exp().reshape(-1, log_q.shape[-1])
    p = log_p.exp().reshape(-1, log_p.shape[-1])
    if mask is not None:
        keep = mask.reshape(-1) > 0
        q, p = q[keep], p[keep]
    n = p.shape[0]
    if n == 0:
        return student_logits.float().sum() * 0.0
    cost = torch.cdist(p.unsqueeze(0), q.unsqueeze(0), p=1).squeeze(0)  # [N(teacher), N(student)]
    log_k = -cost / epsilon
    log_mu = torch.full((n,), -math.log(n), dtype=cost.dtype, device=cost.device)
    log_a = torch.zeros_like(log_mu)
    log_b = torch.zeros_like(log_mu)
    for _ in range(iters):
        log_a = log_mu - torch.logsumexp(log_k + log_b[None, :], dim=1)
        log_b = log_mu - torch.logsumexp(log_k + log_a[:, None], dim=0)
    plan = torch.exp(log_a[:, None] + log_k + log_b[None, :])
    return (plan * cost).sum()


def mi_alpha_bound(scores: torch.Tensor, alpha: float, log_baseline: float = 0.0) -> torch.Tensor:
    """The interpolated mutual-information lower bound I_alpha (Poole et al. 2019, "On Variational
    Bounds of Mutual Information"), which Distiller (He et al. 2021, "Distiller: A
    Systematic Study of Model Distillation Methods in Natural Language Processing") uses as its MI-alpha
    objective for intermediate representations:

        I_alpha = 1 + E_{p(x_1:K) p(y|x_1)} [ log e^{f(x_1, y)} / (alpha m(y; x_1:K) + (1 - alpha) q(y)) ]
                    - E_{p(x_1:K) p(y)}      [ e^{f(x_1, y)}   / (alpha m(y; x_1:K) + (1 - alpha) q(y)) ],
        m(y; x_1:K) = 1/K sum_k e^{f(x_k, y)},    q(y) = e^{log_baseline}.

    ``scores[i, k] = f(x_k, y_i)`` for N pairs (x_i, y_i) drawn jointly. As in the paper's estimator,
    every ordered pair i != j is used with K = N - 1 samples: the joint term pairs y_i with x_i and
    leaves x_j out of m, the marginal term pairs y_i with x_j (independent of y_i) and leaves x_i out:

        I_alpha = 1 + mean_{i != j} [ S_ii - b_ij ] - mean_{i != j} exp(S_ij - b_ii),
        b_ij = log(alpha * mean_{k != j} e^{S_ik} + (1 - alpha) * q).

    alpha = 1: the marginal term is exactly 1 and I_1 is InfoNCE (van den Oord et al. 2018) with
    K = N - 1 samples, bounded by log(N - 1) (low variance, high bias). alpha = 0: I_0 = 1 + mean_i
    [S_ii - log q] - mean_{i != j} e^{S_ij} / q, the single-sample TUBA/NWJ bound (unbiased, high
    variance). The leave-one-out log-means are exact: a row's largest score is removed by masking,
    every other one by log(e^r - e^s), which is well conditioned once the maximum is gone.
    """
    n = scores.shape[0]
    if scores.ndim != 2 or scores.shape[1] != n or n < 2:
        raise ValueError(f"scores must be a square matrix of at least 2 x 2, got {tuple(scores.shape)}")
    s = scores.float()
    lse = torch.logsumexp(s, dim=1, keepdim=True)
    top = s.argmax(dim=1, keepdim=True)
    is_top = torch.zeros_like(s, dtype=torch.bool).scatter_(1, top, True)
    lse_without_top = torch.logsumexp(s.masked_fill(is_top, float("-inf")), dim=1, keepdim=True)
    gap = (s - lse).clamp(max=-math.log(2.0))  # <= log(1/2) for every entry that is not the row maximum
    loo = torch.where(is_top, lse_without_top, lse + torch.log(-torch.expm1(gap)))
    log_mean = loo - math.log(n - 1)  # log mean_{k != j} e^{S_ik}
    b = _log_mix(log_mean, torch.full_like(log_mean, log_baseline), alpha)
    off = ~torch.eye(n, dtype=torch.bool, device=s.device)
    pairs = n * (n - 1)
    joint = (s.diagonal()[:, None] - b).masked_fill(~off, 0.0).sum() / pairs
    # the diagonal is masked before exp: e^{S_ii - b_ii} may overflow, and inf * 0 is nan
    marginal = torch.exp((s - b.diagonal()[:, None]).masked_fill(~off, float("-inf"))).sum() / pairs
    return 1.0 + joint - marginal


DIVERGENCES = {
    "fkl": forward_kl,
    "rkl": reverse_kl,
    "jsd": generalized_jsd,
    "sfkl": skew_forward_kl,
    "srkl": skew_reverse_kl,
    "tvd": total_variation,
}


def divergence(
    name: str,
    student_logits,
    teacher_logits,
    mask=None,
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> torch.Tensor:
    """Dispatch by recipe name (``kd.divergence``), passing each function only its own parameter."""
    fn = DIVERGENCES[name]
    if name == "jsd":
        return fn(student_logits, teacher_logits, mask, temperature, beta=beta)
    if name in ("sfkl", "srkl"):
        return fn(student_logits, teacher_logits, mask, temperature, alpha=alpha)
    return fn(student_logits, teacher_logits, mask, temperature)
