"""The classifier family's equations against independent computations: ECE and accuracy by hand,
Hinton's KD term in float64, LELP's subclass targets by hand on a tiny embedding set and against a
numpy reference, class probability = sum of subclass probabilities, and the shipped teacher loaded
into the family's network (its recorded eval accuracy, through the torch runtime)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stillroom.core.errors import StillroomError
from stillroom.plugins.classifier import metrics
from stillroom.plugins.classifier.methods.kd import soft_target_kl
from stillroom.plugins.classifier.methods.lelp import SubclassSplit
from stillroom.plugins.classifier.models import ClassifierConfig, ConvClassifier


# -- metrics ------------------------------------------------------------------------------------------
def test_ece_by_hand():
    # confidences 0.90 (right) and 0.91 (wrong) share the bin (13/15, 14/15]; 0.81 (wrong), 0.55 (right)
    # and 0.70 (right) each have a bin of their own
    probs = np.array([[0.90, 0.10], [0.09, 0.91], [0.81, 0.19], [0.55, 0.45], [0.30, 0.70]])
    labels = np.array([0, 0, 1, 0, 1])
    shared = 2 / 5 * abs(0.5 - (0.90 + 0.91) / 2)
    alone = (abs(0 - 0.81) + abs(1 - 0.55) + abs(1 - 0.70)) / 5
    assert metrics.expected_calibration_error(probs, labels) == pytest.approx(shared + alone)
    assert metrics.accuracy(probs, labels) == pytest.approx(3 / 5)


def test_ece_is_zero_when_confidence_matches_accuracy_and_counts_bins_by_size():
    probs = np.tile([0.7, 0.2, 0.1], (10, 1))
    labels = np.array([0] * 7 + [1] * 3)  # 70 % right at 70 % confidence
    assert metrics.expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)
    # one bin: always right at confidence 0.7 -> |1 - 0.7|; fewer bins do not change a single bin
    assert metrics.expected_calibration_error(probs, np.zeros(10)) == pytest.approx(0.3)
    assert metrics.expected_calibration_error(probs, np.zeros(10), bins=2) == pytest.approx(0.3)


def test_top1_agreement_and_softmax():
    assert metrics.top1_agreement(np.array([1, 2, 3, 4]), np.array([1, 0, 3, 0])) == 0.5
    p = metrics.softmax(np.array([[1000.0, 1000.0 + math.log(3)]]))  # no overflow at large logits
    assert p == pytest.approx(np.array([[0.25, 0.75]]))


# -- Hinton KD ----------------------------------------------------------------------------------------
def test_soft_target_kl_is_t2_kl_of_softened_distributions():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=gen) * 3, torch.randn(6, 5, generator=gen) * 3
    for temperature in (1.0, 4.0):
        p = torch.softmax(t.double() / temperature, -1)
        q = torch.softmax(s.double() / temperature, -1)
        want = temperature**2 * (p * (p.log() - q.log())).sum(-1).mean()
        assert float(soft_target_kl(s, t, temperature)) == pytest.approx(float(want), rel=1e-5)
    assert float(soft_target_kl(t, t, 2.0)) == pytest.approx(0.0, abs=1e-6)


# -- LELP -----------------------------------------------------------------------------------------------
def test_lelp_subclass_targets_by_hand():
    """D = 3, C = 2, the head reads e1 and e2, so the null space is e3. Class 0 varies most along e1
    (which the projection removes) and otherwise along e3; class 1 only along e3."""
    head = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    class0 = [[10.0, 0.0, -2.0], [-10.0, 0.0, -1.0], [-10.0, 0.0, 1.0], [10.0, 0.0, 2.0]]
    class1 = [[0.0, 3.0, 0.0], [0.0, 1.0, 4.0]]
    features = torch.tensor(class0 + class1, dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 0, 1, 1])
    split = SubclassSplit.fit(features, labels, head, m=1, null_space=True)
    # class 0 along e3: -2, -1, 1, 2: mean 0, variance (4 + 1 + 1 + 4) / 4 = 2.5
    # class 1 along e3: 0, 4: mean 2, variance 4
    sigma0, sigma1 = math.sqrt(2.5), 2.0
    x = torch.tensor([[7.0, -3.0, sigma0]], dtype=torch.float64)  # e1, e2 do not matter after the projection
    s0, s1 = sigma0 / sigma0, (sigma0 - 2.0) / sigma1
    assert split.scores(x).flatten().tolist() == pytest.approx([s0, -s0, s1, -s1])

    logits = torch.tensor([[2.0, 0.0]])
    p0, p1 = math.exp(2) / (math.exp(2) + 1), 1 / (math.exp(2) + 1)

    def side(s):  # softmax over the two sides (s, -s)
        return math.exp(s) / (math.exp(s) + math.exp(-s))

    want = [p0 * side(s0), p0 * side(-s0), p1 * side(s1), p1 * side(-s1)]
    assert torch.exp(split.targets(logits, x)).squeeze(0).tolist() == pytest.approx(want, rel=1e-9)

    # without the projection class 0's main direction is e1 (variance 100, uncorrelated with e3)
    raw = SubclassSplit.fit(features, labels, head, m=1, null_space=False)
    assert raw.directions[0, 0].tolist() == pytest.approx([0.1, 0.0, 0.0], abs=1e-9)


def test_lelp_split_matches_a_numpy_reference():
    rng = np.random.default_rng(0)
    n, d, c, m = 90, 8, 3, 2
    z = rng.standard_normal((n, d)) * rng.uniform(0.5, 3.0, size=d)
    y = np.arange(n) % c
    w = rng.standard_normal((c, d))
    logits = rng.standard_normal((n, c))

    projector = np.eye(d) - np.linalg.pinv(w) @ w
    pz = z @ projector
    reference = np.zeros((n, c, 2 * m))
    for k in range(c):
        zk = pz[y == k]
        mu = zk.mean(0)
        values, vectors = np.linalg.eigh(np.cov(zk, rowvar=False, bias=True))
        order = np.argsort(values)[::-1][:m]
        for i, j in enumerate(order):
            v = vectors[:, j] * np.sign(vectors[np.argmax(np.abs(vectors[:, j])), j])
            score = (pz - mu) @ v / np.sqrt(values[j])
            reference[:, k, 2 * i], reference[:, k, 2 * i + 1] = score, -score
    log_sub = reference - np.log(np.exp(reference).sum(-1, keepdims=True))
    log_class = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = (log_class[:, :, None] + log_sub).reshape(n, c * 2 * m)

    split = SubclassSplit.fit(
        torch.from_numpy(z), torch.from_numpy(y), torch.from_numpy(w), m, null_space=True
    )
    got = split.targets(torch.from_numpy(logits), torch.from_numpy(z)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-9)
    # the subclass probabilities of a class add up to the teacher's class probability
    np.testing.assert_allclose(np.exp(got).reshape(n, c, 2 * m).sum(-1), np.exp(log_class), atol=1e-12)


def test_lelp_refuses_more_directions_than_the_null_space_holds():
    z, y, w = torch.randn(20, 5), torch.arange(20) % 2, torch.randn(2, 5)
    with pytest.raises(
        StillroomError, match="4 directions per class, but the teacher.s embedding leaves only 3"
    ):
        SubclassSplit.fit(z, y, w, m=4, null_space=True)


# -- the network ------------------------------------------------------------------------------------------
def test_class_probability_is_the_sum_of_its_subclass_probabilities():
    torch.manual_seed(0)
    model = ConvClassifier(
        ClassifierConfig(channels=[4], convs_per_stage=1, feature_dim=8, subclasses=3)
    ).eval()
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        sub = torch.softmax(model.subclass_logits(x).double(), -1)  # [5, 30], class-major
        classes = torch.softmax(model(x).double(), -1)  # [5, 10]
    assert classes.shape == (5, 10)
    torch.testing.assert_close(classes, sub.reshape(5, 10, 3).sum(-1))


def test_shipped_teacher_loads_into_the_family_network():
    """``embedded:mnist_classifier`` (config: eval_accuracy 0.989) through the torch runtime, which
    normalises 8-bit pixels as its spec says."""
    from stillroom.plugins.classifier import data
    from stillroom.plugins.classifier.runtime import load

    pixels, labels = data.load_split("embedded:mnist", "eval")
    teacher = load("torch", "embedded:mnist_classifier")
    assert teacher.spec.mean == [0.5] and teacher.spec.class_names[3] == "3"
    assert metrics.accuracy(teacher.logits(pixels), labels) == pytest.approx(0.989)
