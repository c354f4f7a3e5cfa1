"""ConvNet-3 and differentiable siamese augmentation (DSA): the evaluation network and protocol of the
dataset distillation papers (Zhao et al. 2021 "Dataset Condensation with Gradient Matching", Zhao &
Bilen 2021 "Dataset Condensation with Differentiable Siamese Augmentation", Cazenavette et al. 2022).

ConvNet-D-W: D blocks of [3x3 conv (W channels), instance norm (GroupNorm(W, W), affine), ReLU, 2x2
average pooling], then a linear classifier. Single-channel 28x28 inputs get padding 3 in the first
conv (28 -> 32, as the papers' code does), so ConvNet-3 ends at 4x4xW. Images enter in pixel space
[0, 1] and are normalised inside the network, so synthetic sets are optimised and stored as pixels.

``augment`` is DSA's ``DiffAugment``: per call one of the strategy's operations (``color`` is
brightness, saturation and contrast in turn), with its random parameters drawn from ``generator``, so a
call is reproducible and differentiable in the images. For MNIST the papers use
``color_crop_cutout_scale_rotate`` (no flip: digits are not mirror symmetric).

``train_and_evaluate`` is the benchmark: a fresh ConvNet trained from scratch on (images, labels) with
SGD (lr 0.01, momentum 0.9, weight decay 5e-4, lr / 10 at half the epochs, batch 256) and DSA, then
scored on held-out images; seeded, deterministic on the CPU.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from pydantic import Field, PositiveInt
from torch import nn
from torch.nn import functional as F

from stillroom.core.method import Params

MEAN, STD = 0.1307, 0.3081  # MNIST pixel statistics (the papers' normalisation)
STRATEGY = "color_crop_cutout_scale_rotate"


class Protocol(Params):
    """How a dataset is scored: fresh ConvNets trained on it, accuracy on the held-out split."""

    seeds: PositiveInt = Field(3, description="networks trained (seeds 0..seeds-1); mean +- std reported")
    epochs: PositiveInt = Field(300, description="training epochs over the distilled / random set")
    full_epochs: PositiveInt = Field(20, description="training epochs of the full-data baseline")
    depth: PositiveInt = 3
    width: PositiveInt = Field(128, description="channels of every conv (128: the papers' ConvNet)")
    lr: float = Field(0.01, gt=0)
    batch_size: PositiveInt = 256
    augment: str = Field(STRATEGY, description="DSA strategy ('' for none)")
    eval_images: int = Field(0, ge=0, description="held-out images scored (0: the whole eval split)")


class ConvNet(nn.Module):
    def __init__(self, channels: int, size: int, classes: int, width: int = 128, depth: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c, s = channels, size
        for d in range(depth):
            pad = 3 if channels == 1 and size == 28 and d == 0 else 1
            layers += [
                nn.Conv2d(c, width, 3, padding=pad),
                nn.GroupNorm(width, width, affine=True),
                nn.ReLU(),
            ]
            c, s = width, (s + 2 * pad - 2) // 2
            layers.append(nn.AvgPool2d(2, 2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c * s * s, classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features((pixels - MEAN) / STD).flatten(1))


# -- DSA ------------------------------------------------------------------------------------------------
def _uniform(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=generator).to(device)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def _color(x, g):
    n = len(x)
    x = x + (_uniform(n, g, x.device) - 0.5).view(-1, 1, 1, 1)  # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_uniform(n, g, x.device) * 2).view(-1, 1, 1, 1) + mean  # saturation
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - mean) * (_uniform(n, g, x.device) + 0.5).view(-1, 1, 1, 1) + mean  # contrast


def _crop(x, g, ratio=0.125):
    n = len(x)
    shift = (torch.rand(n, 2, generator=g) * 2 - 1).to(x.device) * ratio * 2  # +-1/8 of the side
    eye = torch.eye(2, device=x.device).expand(n, 2, 2)
    return _affine(x, torch.cat([eye, shift.unsqueeze(-1)], dim=2))


def _cutout(x, g, ratio=0.5):
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = torch.randint(0, h + (1 - ch % 2), (n, 1, 1), generator=g).to(x.device)
    cx = torch.randint(0, w + (1 - cw % 2), (n, 1, 1), generator=g).to(x.device)
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    hole = ((ys - cy).abs() <= ch // 2) & ((xs - cx).abs() <= cw // 2)
    return x * (~hole).unsqueeze(1).to(x.dtype)


def _scale(x, g, ratio=1.2):
    n = len(x)
    s = (torch.rand(n, 2, generator=g) * (ratio - 1 / ratio) + 1 / ratio).to(x.device)
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 1, 1] = s[:, 0], s[:, 1]
    return _affine(x, theta)


def _rotate(x, g, degrees=15.0):
    n = len(x)
    a = ((torch.rand(n, generator=g) - 0.5) * 2 * degrees / 180 * math.pi).to(x.device)
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = a.cos(), -a.sin(), a.sin(), a.cos()
    return _affine(x, theta)


OPS = {"color": _color, "crop": _crop, "cutout": _cutout, "scale": _scale, "rotate": _rotate}


def augment(x: torch.Tensor, strategy: str, generator: torch.Generator) -> torch.Tensor:
    """DSA's DiffAugment: one operation of ``strategy`` (``a_b_c``) drawn per call, applied to the batch."""
    if not strategy:
        return x
    names = strategy.split("_")
    unknown = [n for n in names if n not in OPS]
    if unknown:
        raise ValueError(f"unknown DSA operation {unknown[0]!r}; known: {', '.join(OPS)}")
    name = names[int(torch.randint(len(names), (1,), generator=generator))]
    return OPS[name](x, generator)


# -- the benchmark --------------------------------------------------------------------------------------
def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against hard labels [B] or soft labels [B, K] (probabilities)."""
    if labels.ndim == 2:
        return -(labels * F.log_softmax(logits, -1)).sum(-1).mean()
    return F.cross_entropy(logits, labels)


def train_and_evaluate(
    images: np.ndarray,
    labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    protocol: Protocol,
    seed: int,
    epochs: int,
    classes: int,
) -> float:
    """Accuracy on the test images of a fresh ConvNet trained on (images, labels) for ``epochs``."""
    with torch.enable_grad():
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        x, y = torch.from_numpy(images).float(), torch.from_numpy(labels)
        net = ConvNet(x.shape[1], x.shape[2], classes, protocol.width, protocol.depth)
        opt = torch.optim.SGD(net.parameters(), lr=protocol.lr, momentum=0.9, weight_decay=5e-4)
        net.train()
        for epoch in range(epochs):
            if epoch == epochs // 2 and epochs > 1:
                for group in opt.param_groups:
                    group["lr"] = protocol.lr * 0.1
            order = torch.randperm(len(x), generator=g)
            for batch in torch.split(order, protocol.batch_size):
                loss = classification_loss(net(augment(x[batch], protocol.augment, g)), y[batch])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    net.eval()
    with torch.no_grad():
        tx = torch.from_numpy(test_images).float()
        pred = torch.cat([net(chunk).argmax(-1) for chunk in torch.split(tx, 500)])
    return float((pred.numpy() == test_labels).mean())
