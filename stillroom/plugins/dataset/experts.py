"""Expert trajectories for trajectory matching (Cazenavette et al. 2022, section 3.1): ConvNets trained
on the real data with SGD and DSA, their parameters saved after every epoch.

Trajectory i is a float32 tensor [epochs + 1, P] (theta*_0 .. theta*_epochs, flattened in
``parameters()`` order). They depend only on the real data and ``ExpertConfig``, never on the method
or IPC, so they are cached across runs under ``$STILLROOM_CACHE/dataset/experts/<key>/expert-NNN.safetensors``
(default ``~/.cache/stillroom``), ``key`` a hash of the source's sha256 and the config. Each file is
written atomically when its expert finishes: an interrupted buffer resumes at the next missing expert.

Two variants change how an expert steps (both off by default, and left out of the cache key while off,
so plain MTT experts keep their folder):

- ``sam_rho`` > 0 (FTD, Du et al. 2023, eq. 7): sharpness-aware minimisation. With g = grad L(theta)
  the weights are perturbed to theta + rho * g / ||g||, and the SGD step uses the gradient there:
  theta <- theta - lr * grad L(theta + rho * g / ||g||). Flat experts, less accumulated error.
- ``clip`` > 0 (the smooth experts of Shen et al. 2024): every step's gradient is clipped to norm
  ``clip`` before the SGD step, g <- g * min(1, clip / ||g||), so no step moves the weights by more than
  lr * clip and the trajectory changes at a bounded rate.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch
from pydantic import Field, PositiveInt
from safetensors import safe_open
from safetensors.torch import save

from stillroom.core.fsio import write_bytes
from stillroom.core.method import Params
from stillroom.plugins.dataset.convnet import STRATEGY, ConvNet, augment, classification_loss
from stillroom.plugins.dataset.data import Real

log = logging.getLogger(__name__)


class ExpertConfig(Params):
    count: PositiveInt = Field(10, description="expert trajectories (different initialisations)")
    epochs: PositiveInt = Field(
        6, description="epochs of each trajectory (>= max_start_epoch + expert_epochs)"
    )
    lr: float = Field(0.01, gt=0, description="the experts' SGD learning rate (no momentum, as MTT's buffer)")
    batch_size: PositiveInt = 256
    width: PositiveInt = Field(128, description="ConvNet width of experts and student")
    depth: PositiveInt = 3
    augment: str = STRATEGY
    sam_rho: float = Field(0.0, ge=0, description="FTD: SAM radius rho of the experts' steps (0: plain SGD)")
    clip: float = Field(0.0, ge=0, description="smooth experts: max gradient norm of each step (0: none)")


OFF = {"sam_rho": 0.0, "clip": 0.0}  # variant fields at these values stay out of the cache key


def cache_root() -> Path:
    return Path(os.environ.get("STILLROOM_CACHE") or Path.home() / ".cache" / "stillroom") / "dataset"


def folder(real: Real, cfg: ExpertConfig) -> Path:
    fields = {k: v for k, v in cfg.model_dump().items() if k not in OFF or v != OFF[k]}
    blob = json.dumps({"source": real.sha256, **fields}, sort_keys=True)
    return cache_root() / "experts" / hashlib.sha256(blob.encode()).hexdigest()[:16]


def network(real: Real, width: int, depth: int) -> ConvNet:
    return ConvNet(real.train_images.shape[1], real.train_images.shape[2], real.classes, width, depth)


def train_expert(real: Real, cfg: ExpertConfig, index: int, advance=lambda: None) -> torch.Tensor:
    """Trajectory ``index``: [epochs + 1, P] parameters, seeded by ``index`` (the caller's RNG is kept:
    a run that trains experts and one that finds them cached continue identically)."""
    with torch.random.fork_rng():
        return _train(real, cfg, index, advance)


def _train(real: Real, cfg: ExpertConfig, index: int, advance) -> torch.Tensor:
    torch.manual_seed(index)
    g = torch.Generator().manual_seed(index)
    net = network(real, cfg.width, cfg.depth)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr)
    x, y = torch.from_numpy(real.train_images), torch.from_numpy(real.train_labels)
    points = [torch.nn.utils.parameters_to_vector(net.parameters()).detach().clone()]
    for _ in range(cfg.epochs):
        for batch in torch.split(torch.randperm(len(x), generator=g), cfg.batch_size):
            xb, yb = augment(x[batch], cfg.augment, g), y[batch]
            step_gradient(net, lambda xb=xb, yb=yb: classification_loss(net(xb), yb), cfg)
            opt.step()
        points.append(torch.nn.utils.parameters_to_vector(net.parameters()).detach().clone())
        advance()
    return torch.stack(points)


def step_gradient(net: torch.nn.Module, loss_fn, cfg: ExpertConfig) -> None:
    """Leaves in ``.grad`` the gradient an expert steps with: plain, SAM's (at the perturbed weights)
    or clipped (see the module docstring); ``loss_fn()`` recomputes the batch loss at the current weights."""
    params = list(net.parameters())
    grads = torch.autograd.grad(loss_fn(), params)
    if cfg.sam_rho > 0:
        scale = cfg.sam_rho / (torch.sqrt(sum(g.pow(2).sum() for g in grads)) + 1e-12)
        eps = [g * scale for g in grads]
        with torch.no_grad():
            for p, e in zip(params, eps, strict=True):
                p.add_(e)  # theta + rho * g / ||g||
        grads = torch.autograd.grad(loss_fn(), params)
        with torch.no_grad():
            for p, e in zip(params, eps, strict=True):
                p.sub_(e)
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    if cfg.clip > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)


def trajectories(real: Real, cfg: ExpertConfig) -> tuple[list[torch.Tensor], float]:
    """Every expert trajectory (trained and cached when missing) and the CPU seconds they cost."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    root = folder(real, cfg)
    files = [root / f"expert-{i:03d}.safetensors" for i in range(cfg.count)]
    missing = [i for i, f in enumerate(files) if not f.is_file()]
    if missing:
        log.info("training %d expert trajectories into %s", len(missing), root)
    columns = (TextColumn("[bold]experts"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not missing) as bar:
        task = bar.add_task("experts", total=len(missing) * cfg.epochs)
        for i in missing:
            started = time.process_time()
            points = train_expert(real, cfg, i, lambda: bar.update(task, advance=1))
            cpu = {"cpu_s": f"{time.process_time() - started:.3f}"}
            write_bytes(files[i], save({"trajectory": points}, metadata=cpu))
    loaded, cpu_s = [], 0.0
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            loaded.append(fh.get_tensor("trajectory"))
            cpu_s += float((fh.metadata() or {}).get("cpu_s", 0.0))
    return loaded, cpu_s
