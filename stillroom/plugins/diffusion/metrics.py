"""Image-quality metrics for MNIST-scale generators, built on a small shipped MNIST classifier.

Why not Inception FID: there is no model hub here and Inception features say little about 28x28
digits. Instead a small CNN (``MnistClassifier``, weights in ``stillroom/data/mnist_classifier``,
trained by ``benchmarks/train_mnist_classifier.py`` on the shipped train split) supplies

- a 128-d penultimate feature vector, used for a Fréchet distance (``fid_like``), a per-class
  diversity score and a per-class k-NN recall, and
- class logits, used for the class accuracy of class-conditional samples.

**``fid_like`` is NOT Inception FID.** Its numbers are only comparable with other ``fid_like``
numbers computed with the same classifier, the same reference split and the same sample count
(the Fréchet distance between sample estimates is biased upwards at small N).

Image convention everywhere: float tensors in [-1, 1], shape [B, 1, 28, 28] (or [B, 1, 32, 32],
which is centre-cropped to 28x28; a padded-to-32 generator therefore works unchanged).
Statistics are computed in float64 numpy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

CLASSIFIER_DIR = "mnist_classifier"
MNIST_FILE = ("mnist", "mnist.npz")


def _data_root() -> Path:
    from stillroom.data import root

    return root()


# --------------------------------------------------------------------------------------------------
# data


def load_mnist_split(split: str = "eval") -> tuple[torch.Tensor, torch.Tensor]:
    """The shipped MNIST subset: ``split`` is "train" (4000) or "eval" (1000), class-balanced.

    Returns (images float32 [N, 1, 28, 28] in [-1, 1], labels int64 [N]).
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    with np.load(_data_root().joinpath(*MNIST_FILE)) as d:
        images = d[f"{split}_images"]
        labels = d[f"{split}_labels"]
    return uint8_to_model(images), torch.from_numpy(labels.astype(np.int64))


def uint8_to_model(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] (or [N, 1, 28, 28]) pixels 0..255 -> float32 [N, 1, 28, 28] in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images)).float()
    if x.dim() == 3:
        x = x.unsqueeze(1)
    return x / 127.5 - 1.0


def to_classifier_input(images: torch.Tensor) -> torch.Tensor:
    """Validate and normalise generator output for the classifier: [B,1,28,28] float in [-1, 1].

    32x32 inputs are centre-cropped (2 pixels each side); values are clamped to [-1, 1] because
    samplers may overshoot slightly and the classifier never saw values outside that range.
    """
    x = torch.as_tensor(images)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"expected images [B, 1, H, W], got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if (h, w) == (32, 32):
        x = x[..., 2:30, 2:30]
    elif (h, w) != (28, 28):
        raise ValueError(f"expected 28x28 or 32x32 images, got {h}x{w}")
    return x.float().clamp(-1.0, 1.0)


# --------------------------------------------------------------------------------------------------
# classifier


class MnistClassifier(nn.Module):
    """A small VGG-style CNN: two conv stages (28 -> 14 -> 7), a 128-d feature layer, 10 logits.

    ``features`` returns the post-ReLU penultimate activations (the analogue of Inception's pool3
    features for FID); ``forward`` returns class logits. No batch-norm, so train/eval mode only
    changes dropout and single images give the same output as in a batch.
    """

    def __init__(self, channels: tuple[int, int] = (32, 64), feature_dim: int = 128, num_classes: int = 10):
        super().__init__()
        c1, c2 = channels
        self.channels = (c1, c2)
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.conv = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c2, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(c2 * 7 * 7, feature_dim)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, num_classes)

    def config(self) -> dict[str, Any]:
        return {
            "channels": list(self.channels),
            "feature_dim": self.feature_dim,
            "num_classes": self.num_classes,
        }

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 1, 28|32, 28|32] in [-1, 1] -> [B, feature_dim] penultimate features."""
        x = to_classifier_input(x).to(self.fc.weight.device)
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))

    def logits_from_features(self, feats: torch.Tensor) -> torch.Tensor:
        """Logits for already-extracted features (eval mode), so one pass gives both."""
        return self.head(feats)


def load_classifier(device: str | torch.device = "cpu", path: str | Path | None = None) -> MnistClassifier:
    """Load the shipped classifier (``stillroom/data/mnist_classifier``) in eval mode on ``device``."""
    from safetensors.torch import load_file

    folder = Path(path) if path is not None else _data_root() / CLASSIFIER_DIR
    cfg = json.loads((folder / "config.json").read_text())
    model = MnistClassifier(tuple(cfg["channels"]), cfg["feature_dim"], cfg["num_classes"])
    model.load_state_dict(load_file(str(folder / "model.safetensors"), device="cpu"))
    return model.to(device).eval()


@torch.no_grad()
def extract(
    classifier: MnistClassifier, images: torch.Tensor, batch_size: int = 500
) -> tuple[np.ndarray, np.ndarray]:
    """Run the classifier over ``images`` in batches: (features float64 [N, D], logits float64 [N, 10])."""
    was_training = classifier.training
    classifier.eval()
    feats, logits = [], []
    for i in range(0, len(images), batch_size):
        f = classifier.features(images[i : i + batch_size])
        feats.append(f.double().cpu())
        logits.append(classifier.logits_from_features(f).double().cpu())
    classifier.train(was_training)
    if not feats:
        raise ValueError("no images given")
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


# --------------------------------------------------------------------------------------------------
# metrics (pure functions of features / logits)


def _as64(a: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix via eigh (tiny negative eigenvalues -> 0)."""
    w, v = np.linalg.eigh((m + m.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def gaussian_stats(feats: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (float64) of features [N, D]; N >= 2."""
    f = _as64(feats)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features [N >= 2, D], got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray, sigma_b: np.ndarray) -> float:
    """Fréchet (2-Wasserstein) distance between N(mu_a, Sa) and N(mu_b, Sb):

        d^2 = ||mu_a - mu_b||^2 + Tr(Sa + Sb - 2 (Sa^1/2 Sb Sa^1/2)^1/2)

    (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule ..."). The trace of the
    matrix square root is the sum of square roots of the eigenvalues of the symmetric PSD matrix
    Sa^1/2 Sb Sa^1/2, which avoids the complex-valued sqrtm(Sa Sb) of the usual implementation.
    """
    mu_a, mu_b, sa, sb = (_as64(x) for x in (mu_a, mu_b, sigma_a, sigma_b))
    root_a = _sqrt_psd(sa)
    inner = root_a @ sb @ root_a
    eig = np.linalg.eigvalsh((inner + inner.T) / 2.0)
    tr_sqrt = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    d2 = float(((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2.0 * tr_sqrt)
    return max(d2, 0.0)  # the true value is >= 0; round-off can make it -1e-12


def fid_like(feats_a: np.ndarray | torch.Tensor, feats_b: np.ndarray | torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two sets of classifier features [N, D].

    NOT Inception FID: it uses the MNIST classifier's features, so values are only comparable
    with the same classifier, reference set and sample sizes. Lower is better; 0 for identical sets.
    """
    return frechet_distance(*gaussian_stats(feats_a), *gaussian_stats(feats_b))


def class_accuracy(logits: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    """Fraction of samples whose argmax logit equals the label (the class a sample was asked for)."""
    lg, lb = _as64(logits), np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if len(lg) != len(lb) or len(lb) == 0:
        raise ValueError(f"logits ({len(lg)}) and labels ({len(lb)}) must be non-empty and equal in length")
    return float((lg.argmax(1) == lb).mean())


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances [len(a), len(b)] in float64."""
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.clip(d2, 0.0, None))


def _labels_np(labels: np.ndarray | torch.Tensor) -> np.ndarray:
    return np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).astype(np.int64)


def mean_pairwise_distance(feats: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    """Per-class mean pairwise feature distance (distinct pairs), averaged over classes with >= 2 samples."""
    f, lb = _as64(feats), _labels_np(labels)
    per_class = []
    for c in np.unique(lb):
        fc = f[lb == c]
        n = len(fc)
        if n < 2:
            continue
        per_class.append(_pairwise(fc, fc).sum() / (n * (n - 1)))
    if not per_class:
        raise ValueError("diversity needs at least one class with two samples")
    return float(np.mean(per_class))


def diversity(
    feats: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    ref_feats: np.ndarray | torch.Tensor | None = None,
    ref_labels: np.ndarray | torch.Tensor | None = None,
) -> float:
    """Within-class spread of samples: mean pairwise feature distance per class, averaged over classes.

    With a reference (real eval data) it is divided by the same quantity on the reference, so ~1.0
    means "as varied as real digits" and ~0 means mode collapse (every sample of a class identical).
    Catches the classic failure of few-step students: right class, one look per class.
    """
    value = mean_pairwise_distance(feats, labels)
    if ref_feats is None:
        return value
    if ref_labels is None:
        raise ValueError("ref_labels must be given with ref_feats")
    return value / mean_pairwise_distance(ref_feats, ref_labels)


def recall(
    gen_feats: np.ndarray | torch.Tensor,
    gen_labels: np.ndarray | torch.Tensor,
    real_feats: np.ndarray | torch.Tensor,
    real_labels: np.ndarray | torch.Tensor,
    k: int = 3,
) -> float:
    """Per-class k-NN recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric ...").

    For each class c, the generated manifold is the union of balls around each generated sample of
    class c with radius = distance to its k-th nearest other generated sample of class c. Recall_c is
    the fraction of real samples of class c that fall inside that union (some generated g with
    ||x - g|| <= r_g). The result is the mean over classes present in both sets. A collapsed
    generator (all samples of a class the same) has radius 0 and recall ~0; matching the real
    distribution gives a high value (not exactly 1 at small N). Classes with <= k generated samples
    are skipped.
    """
    gf, gl, rf, rl = _as64(gen_feats), _labels_np(gen_labels), _as64(real_feats), _labels_np(real_labels)
    per_class = []
    for c in np.intersect1d(np.unique(gl), np.unique(rl)):
        g, r = gf[gl == c], rf[rl == c]
        if len(g) <= k:
            continue
        radii = np.sort(_pairwise(g, g), axis=1)[:, k]  # column 0 is the sample itself
        covered = (_pairwise(r, g) <= radii[None, :]).any(axis=1)
        per_class.append(covered.mean())
    if not per_class:
        raise ValueError(f"recall needs a class with more than k={k} generated samples and real samples")
    return float(np.mean(per_class))


# --------------------------------------------------------------------------------------------------
# one call for a generator's samples


def _reference(classifier: MnistClassifier, reference: str | tuple) -> tuple[np.ndarray, np.ndarray]:
    """(features, labels) of the reference set: "eval"/"train" (shipped split) or (images, labels).

    Recomputed on every call (1000 images take well under a second) so a cache can never go stale.
    """
    images, labels = load_mnist_split(reference) if isinstance(reference, str) else reference
    feats, _ = extract(classifier, images)
    return feats, _labels_np(labels)


def evaluate_images(
    images: torch.Tensor,
    labels: torch.Tensor | np.ndarray,
    classifier: MnistClassifier | None = None,
    reference: str | tuple = "eval",
    k: int = 3,
) -> dict[str, float]:
    """Score class-conditional samples against real MNIST.

    ``images``: [N, 1, 28|32, 28|32] in [-1, 1]; ``labels``: the class each sample was generated for.
    ``reference``: "eval" (the shipped 1000-image eval split, default), "train", or (images, labels).
    Returns {"fid_like", "class_accuracy", "diversity", "recall"}; see the functions of those names.
    Use >= 50 samples per class for stable numbers and compare runs at equal N.
    """
    classifier = classifier if classifier is not None else load_classifier()
    feats, logits = extract(classifier, images)
    ref_feats, ref_labels = _reference(classifier, reference)
    labels_np = _labels_np(labels)
    return {
        "fid_like": fid_like(feats, ref_feats),
        "class_accuracy": class_accuracy(logits, labels_np),
        "diversity": diversity(feats, labels_np, ref_feats, ref_labels),
        "recall": recall(feats, labels_np, ref_feats, ref_labels, k=k),
    }
