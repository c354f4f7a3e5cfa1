"""Every LM distillation loss against an independent float64 reference written from its equation,
its limiting cases, masking, and the stop-gradient into the teacher."""

from __future__ import annotations

import math

import pytest
import torch

from stillroom.plugins.lm import losses, topk

B, L, V = 2, 5, 7


def softmax64(z, T=1.0):
    z = z.double() / T
    return torch.exp(z - torch.logsumexp(z, -1, keepdim=True))


def kl64(a, b):
    """sum a log(a / b), the textbook definition, float64."""
    return (a * (a.log() - b.log())).sum(-1)


def masked_mean64(x, mask):
    if mask is None:
        return x.mean()
    m = mask.double()
    return (x * m).sum() / m.sum()


def ref_fkl(s, t, mask=None, T=1.0):
    return T * T * masked_mean64(kl64(softmax64(t, T), softmax64(s, T)), mask)


def ref_rkl(s, t, mask=None, T=1.0):
    return T * T * masked_mean64(kl64(softmax64(s, T), softmax64(t, T)), mask)


def ref_jsd(s, t, mask=None, T=1.0, beta=0.5):
    p, q = softmax64(t, T), softmax64(s, T)
    m = beta * p + (1 - beta) * q
    return T * T * masked_mean64(beta * kl64(p, m) + (1 - beta) * kl64(q, m), mask)


def ref_sfkl(s, t, mask=None, T=1.0, alpha=0.1):
    p, q = softmax64(t, T), softmax64(s, T)
    return T * T * masked_mean64(kl64(p, alpha * p + (1 - alpha) * q), mask)


def ref_srkl(s, t, mask=None, T=1.0, alpha=0.1):
    p, q = softmax64(t, T), softmax64(s, T)
    return T * T * masked_mean64(kl64(q, (1 - alpha) * p + alpha * q), mask)


def ref_tvd(s, t, mask=None, T=1.0):
    return T * T * masked_mean64(0.5 * (softmax64(t, T) - softmax64(s, T)).abs().sum(-1), mask)


def ref_taid(s, t, tt, mask=None):
    target = softmax64((1 - tt) * s.double() + tt * t.double())
    return masked_mean64(kl64(target, softmax64(s)), mask)


def ref_sinkhorn(s, t, eps, iters, T=1.0):
    """Plain (not log-domain) Sinkhorn-Knopp on the L1 cost, float64."""
    p = softmax64(t, T).reshape(-1, V)
    q = softmax64(s, T).reshape(-1, V)
    n = p.shape[0]
    cost = (p[:, None, :] - q[None, :, :]).abs().sum(-1)
    K = torch.exp(-cost / eps)
    mu = torch.full((n,), 1.0 / n, dtype=torch.float64)
    a, b = torch.ones(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
    for _ in range(iters):
        a = mu / (K @ b)
        b = mu / (K.T @ a)
    plan = a[:, None] * K * b[None, :]
    return (plan * cost).sum()


@pytest.fixture()
def logits():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(B, L, V, generator=g) * 2
    t = torch.randn(B, L, V, generator=g) * 2
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]])
    return s, t, mask


CASES = [
    (losses.forward_kl, ref_fkl, {}),
    (losses.reverse_kl, ref_rkl, {}),
    (losses.generalized_jsd, ref_jsd, {"beta": 0.3}),
    (losses.generalized_jsd, ref_jsd, {"beta": 0.5}),
    (losses.skew_forward_kl, ref_sfkl, {"alpha": 0.1}),
    (losses.skew_forward_kl, ref_sfkl, {"alpha": 0.4}),
    (losses.skew_reverse_kl, ref_srkl, {"alpha": 0.1}),
    (losses.total_variation, ref_tvd, {}),
]


@pytest.mark.parametrize("fn,ref,kw", CASES, ids=lambda x: getattr(x, "__name__", str(x)))
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_divergence_matches_float64_reference(logits, fn, ref, kw, T):
    s, t, mask = logits
    got = fn(s, t, mask, T, **kw)
    assert got.ndim == 0
    assert got.item() == pytest.approx(ref(s, t, mask, T, **kw).item(), rel=1e-5, abs=1e-6)
    # unmasked and flattened [N, V] inputs agree with the reference too
    assert fn(s, t, None, T, **kw).item() == pytest.approx(
        ref(s, t, None, T, **kw).item(), rel=1e-5, abs=1e-6
    )
    flat = fn(s.reshape(-1, V), t.reshape(-1, V), mask.reshape(-1), T, **kw)
    assert flat.item() == pytest.approx(got.item(), rel=1e-6)


def test_divergences_are_zero_for_identical_distributions_and_positive_otherwise(logits):
    s, t, _ = logits
    for fn, _, kw in CASES:
        assert fn(s, s.clone(), **kw).item() == pytest.approx(0.0, abs=1e-6)
        assert fn(s, t, **kw).item() > 1e-3


def test_limiting_cases(logits):
    s, t, mask = logits
    fkl, rkl = losses.forward_kl(s, t, mask, 2.0), losses.reverse_kl(s, t, mask, 2.0)
    assert torch.equal(losses.generalized_jsd(s, t, mask, 2.0, beta=0.0), fkl)
    assert torch.equal(losses.generalized_jsd(s, t, mask, 2.0, beta=1.0), rkl)
    # the interior formula approaches the end points as JSD/beta and JSD/(1 - beta)
    eps = 1e-4
    assert (
        losses.generalized_jsd(s.double(), t.double(), mask, 2.0, beta=eps) / eps
    ).item() == pytest.approx(fkl.item(), rel=1e-3)
    assert (
        losses.generalized_jsd(s.double(), t.double(), mask, 2.0, beta=1 - eps) / eps
    ).item() == pytest.approx(rkl.item(), rel=1e-3)
    assert losses.skew_forward_kl(s, t, mask, 2.0, alpha=0.0).item() == pytest.approx(fkl.item(), rel=1e-6)
    assert losses.skew_reverse_kl(s, t, mask, 2.0, alpha=0.0).item() == pytest.approx(rkl.item(), rel=1e-6)
    # skewing bounds the divergence by log(1/alpha)
    huge = torch.zeros(1, V)
    huge[0, 0] = 50.0
    assert losses.skew_forward_kl(-huge, huge, alpha=0.1).item() <= math.log(10) + 1e-5
    # TAID: t = 1 is forward KL at T = 1; t = 0 is the student itself (zero loss)
    assert losses.taid_loss(s, t, 1.0, mask).item() == pytest.approx(
        losses.forward_kl(s, t, mask).item(), rel=1e-6
    )
    assert losses.taid_loss(s, t, 0.0, mask).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("tt", [0.2, 0.7])
def test_taid_matches_reference(logits, tt):
    s, t, mask = logits
    assert losses.taid_loss(s, t, tt, mask).item() == pytest.approx(ref_taid(s, t, tt, mask).item(), rel=1e-5)


@pytest.mark.parametrize("eps,T", [(0.1, 1.0), (0.5, 2.0)])
def test_sinkhorn_matches_reference(logits, eps, T):
    s, t, _ = logits
    got = losses.sinkhorn_loss(s, t, epsilon=eps, iters=30, temperature=T)
    assert got.item() == pytest.approx(ref_sinkhorn(s, t, eps, 30, T).item(), rel=1e-4)
    assert losses.sinkhorn_loss(s, s.clone(), epsilon=0.01, iters=50).item() < 0.25 * got.item()
    keep = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 0, 1])
    sel = keep.bool()
    masked = losses.sinkhorn_loss(s.reshape(-1, V), t.reshape(-1, V), eps, 30, T, mask=keep)
    assert masked.item() == pytest.approx(
        losses.sinkhorn_loss(s.reshape(-1, V)[sel], t.reshape(-1, V)[sel], eps, 30, T).item(), rel=1e-6
    )


ALL = [(fn, kw) for fn, _, kw in CASES] + [
    (lambda s, t, m, T: losses.taid_loss(s, t, 0.6, m), {}),
]


@pytest.mark.parametrize("fn,kw", ALL)
def test_masked_positions_do_not_change_the_loss(logits, fn, kw):
    s, t, mask = logits
    before = fn(s, t, mask, 1.5, **kw)
    s2, t2 = s.clone(), t.clone()
    s2[mask == 0] = torch.randn_like(s2[mask == 0]) * 10
    t2[mask == 0] = torch.randn_like(t2[mask == 0]) * 10
    assert fn(s2, t2, mask, 1.5, **kw).item() == pytest.approx(before.item(), rel=1e-6)
    # and the masked student logits receive no gradient
    s3 = s.clone().requires_grad_(True)
    fn(s3, t, mask, 1.5, **kw).backward()
    assert torch.all(s3.grad[mask == 0] == 0) and s3.grad[mask == 1].abs().sum() > 0


@pytest.mark.parametrize("fn,kw", ALL + [(lambda s, t, m, T: losses.sinkhorn_loss(s, t, 0.1, 10, T), {})])
def test_no_gradient_reaches_the_teacher(logits, fn, kw):
    s, t, mask = logits
    s = s.clone().requires_grad_(True)
    t = t.clone().requires_grad_(True)
    fn(s, t, mask, 1.0, **kw).backward()
    assert t.grad is None and s.grad is not None and torch.isfinite(s.grad).all()


def test_gradient_of_forward_kl_is_the_textbook_one(logits):
    """d/dz_s T^2 KL(p||q) per position = T (q - p); a check on the T^2 scaling."""
    s, t, _ = logits
    T = 2.0
    s = s.double().requires_grad_(True)
    losses.forward_kl(s, t.double(), None, T).backward()
    expected = T * (softmax64(s.detach(), T) - softmax64(t, T)) / (B * L)
    assert torch.allclose(s.grad, expected, atol=1e-10)


def test_topk_bins_are_exact_with_the_whole_vocabulary_and_bounded_below_full_kl(logits):
    s, t, mask = logits
    T = 2.0
    log_p = torch.log_softmax(t / T, -1)

    def rows(k):
        values, idx = log_p.topk(k, -1)
        tail = torch.logsumexp(log_p.scatter(-1, idx, float("-inf")), -1).clamp_min(topk.TAIL_FLOOR)
        return {"topk_indices": idx, "topk_logprobs": values, "topk_tail": tail}

    full = losses.forward_kl(s, t, mask, T)
    s_bins, t_bins = topk.bins(s, rows(V), T)
    assert losses.forward_kl(s_bins, t_bins, mask, T).item() == pytest.approx(full.item(), rel=1e-4)
    s_bins, t_bins = topk.bins(s, rows(3), T)
    coarse = losses.forward_kl(s_bins, t_bins, mask, T)
    # reference: KL between the distributions merged onto (top-3, everything else), float64
    p, q = softmax64(t, T), softmax64(s, T)
    idx = rows(3)["topk_indices"]
    pb = torch.cat([p.gather(-1, idx), 1 - p.gather(-1, idx).sum(-1, keepdim=True)], -1)
    qb = torch.cat([q.gather(-1, idx), 1 - q.gather(-1, idx).sum(-1, keepdim=True)], -1)
    assert coarse.item() == pytest.approx((T * T * masked_mean64(kl64(pb, qb), mask)).item(), rel=1e-4)
    assert 0 < coarse.item() <= full.item() + 1e-6


# -- MI-alpha (Distiller / Poole et al. 2019's interpolated bound) ---------------------------------
def ref_mi_alpha(S, alpha, log_q=0.0):
    """I_alpha written out with loops over the ordered pairs i != j, float64."""
    S = S.double()
    n, q = S.shape[0], math.exp(log_q)

    def baseline(i, left_out):  # alpha * mean_{k != left_out} e^{S_ik} + (1 - alpha) q
        m = sum(math.exp(S[i, k]) for k in range(n) if k != left_out) / (n - 1)
        return alpha * m + (1 - alpha) * q

    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    joint = sum(S[i, i].item() - math.log(baseline(i, j)) for i, j in pairs) / len(pairs)
    marginal = sum(math.exp(S[i, j]) / baseline(i, i) for i, j in pairs) / len(pairs)
    return 1 + joint - marginal


@pytest.fixture()
def scores():
    return torch.randn(6, 6, generator=torch.Generator().manual_seed(3)) * 2


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.8, 1.0])
@pytest.mark.parametrize("log_q", [0.0, 0.7])
def test_mi_alpha_matches_loop_reference(scores, alpha, log_q):
    got = losses.mi_alpha_bound(scores, alpha, log_q)
    assert got.item() == pytest.approx(ref_mi_alpha(scores, alpha, log_q), rel=1e-5, abs=1e-6)


def test_mi_alpha_limits_are_infonce_and_tuba(scores):
    n = scores.shape[0]
    # alpha = 1: InfoNCE with K = N - 1, i.e. log(N - 1) - cross-entropy of the diagonal, averaged over
    # which sample is left out (the marginal term is exactly 1)
    nce = []
    for j in range(n):
        keep = [k for k in range(n) if k != j]
        sub = scores[keep][:, keep]
        nce.append(math.log(n - 1) - torch.nn.functional.cross_entropy(sub, torch.arange(n - 1)).item())
    assert losses.mi_alpha_bound(scores, 1.0).item() == pytest.approx(sum(nce) / n, rel=1e-5)
    # alpha = 0: the TUBA/NWJ bound 1 + E_p[f - log q] - E_{p(x)p(y)}[e^f / q]
    off = ~torch.eye(n, dtype=torch.bool)
    tuba = 1 + (scores.diagonal() - 0.5).mean() - (scores.exp()[off] / math.exp(0.5)).mean()
    assert losses.mi_alpha_bound(scores, 0.0, 0.5).item() == pytest.approx(tuba.item(), rel=1e-5)


def test_mi_alpha_estimates_the_mutual_information_of_correlated_gaussians():
    """With the optimal critic f = log p(y|x) - log p(y), I_0 is unbiased and I_1 <= log(N - 1)."""
    rho, n = 0.8, 400
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    y = rho * x + math.sqrt(1 - rho**2) * torch.randn(n, generator=g, dtype=torch.float64)
    var = 1 - rho**2  # scores[i, k] = f(x_k, y_i)
    S = -((y[:, None] - rho * x[None, :]) ** 2) / (2 * var) - 0.5 * math.log(var) + y[:, None] ** 2 / 2
    truth = -0.5 * math.log(1 - rho**2)  # 0.51 nats
    for alpha in (0.0, 0.5, 1.0):
        assert losses.mi_alpha_bound(S, alpha).item() == pytest.approx(truth, abs=0.08)
    assert losses.mi_alpha_bound(S * 50, 1.0).item() <= math.log(n - 1) + 1e-6


def test_mi_alpha_is_finite_with_a_dominant_positive_and_its_gradient_too():
    S = torch.full((5, 5), -200.0)
    S.fill_diagonal_(0.0)
    S = S.requires_grad_(True)
    value = losses.mi_alpha_bound(S, 0.5)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(S.grad).all()
    assert value.item() == pytest.approx(ref_mi_alpha(S.detach(), 0.5), rel=1e-6)


def test_hidden_mi_alpha_objective_is_mse_like_at_alpha_0_and_spares_the_teacher():
    from stillroom.plugins.lm.methods.hidden import HiddenObjective, hidden_distance

    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(2, 4, 8, generator=g) * 10
    student = (teacher + 0.3 * torch.randn(2, 4, 8, generator=g)).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    keep = mask.bool()
    tau, D = 0.1, 8
    s, t = student.detach()[keep].double(), teacher[keep].double()
    v = t.var(dim=0, unbiased=False).mean()
    mse = ((s - t) ** 2).mean()
    n = s.shape[0]
    repulsion = sum(
        math.exp(-((s[k] - t[i]) ** 2).sum().item() / (D * tau * v.item()))
        for i in range(n)
        for k in range(n)
        if i != k
    ) / (n * (n - 1))
    assert repulsion < 1e-3  # the other positions are far apart: what is left is MSE
    teacher = teacher.requires_grad_(True)
    objective = HiddenObjective(hidden_loss="mi_alpha", mi_alpha=0.0, mi_temperature=tau)
    got = hidden_distance(student, teacher, mask, objective)
    assert got.item() == pytest.approx((mse / (tau * v) - 1 + repulsion).item(), rel=1e-5)
    got.backward()
    assert teacher.grad is None and torch.all(student.grad[~keep] == 0) and student.grad[keep].abs().sum() > 0
    # alpha = 1 scores the same features contrastively: -InfoNCE >= -log(N - 1)
    infonce = hidden_distance(student, teacher, mask, HiddenObjective(hidden_loss="mi_alpha", mi_alpha=1.0))
    assert -math.log(keep.sum().item() - 1) - 1e-6 <= infonce.item() < 0
