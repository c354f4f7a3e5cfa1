"""Quality of a classifier's predictions: accuracy, calibration, agreement with another model.

Pure functions of class probabilities [N, C] (float64 numpy) and labels [N].

Expected calibration error (Guo et al. 2017, "On Calibration of Modern Neural Networks", eq. 3):
the confidences conf_i = max_c p_ic are put into M equal-width bins B_m = ((m-1)/M, m/M] and

    ECE = sum_m |B_m| / N * |acc(B_m) - conf(B_m)|

where acc(B_m) is the fraction of correct top-1 predictions in the bin and conf(B_m) their mean
confidence. M = 15, as in that paper. 0 is perfectly calibrated; lower is better.
"""

from __future__ import annotations

import numpy as np

ECE_BINS = 15


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """The fraction of rows whose most probable class is the label."""
    return float((np.asarray(probs).argmax(-1) == np.asarray(labels)).mean())


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE over ``bins`` equal-width confidence bins (see the module docstring)."""
    p = np.asarray(probs, dtype=np.float64)
    confidence, correct = p.max(-1), p.argmax(-1) == np.asarray(labels)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lower, upper in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (confidence > lower) & (confidence <= upper)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def top1_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """The fraction of rows where two models' predicted classes ([N] each) are the same."""
    return float((np.asarray(a) == np.asarray(b)).mean())
