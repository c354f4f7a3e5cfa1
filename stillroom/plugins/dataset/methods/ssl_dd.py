"""Kernel Ridge Regression on Self-supervised Targets (KRR-ST; Lee et al. 2024, "Self-Supervised
Dataset Distillation for Transfer Learning", ICLR 2024): distil images X_s together with target
representations Y_s so that a network pretrained on (X_s, Y_s) transfers.

Target model. An encoder g (ConvNet, ``target``) is trained self-supervised on the real training images
with SimCLR's NT-Xent (the paper uses Barlow Twins; this is the "simple SimCLR" choice): two DSA views
v, v' of every image, z = normalise(W g(v)), and for the 2B views with positives (k, k +- B)

    l_k = -log( exp(z_k . z_pos(k) / t) / sum_{m != k} exp(z_k . z_m / t) ),   L_ssl = mean_k l_k

It is trained once per (source, config) and cached under ``$STILLROOM_CACHE/dataset/ssl/``. The real
targets are Y_t = g(X_t), standardised per dimension over the real split.

Distillation. X_s starts from ``ipc`` random real images per class and Y_s from their targets; both are
the trainable ``student`` role. A pool of ``pool_size`` feature extractors f_omega (ConvNets, features
flattened, with a linear head h to the target dimension d) gives the kernel
K_XX' = f_omega(X) f_omega(X')^T / D (D the feature dimension). Each outer step samples a pool member
(global RNG) and a real batch (X_t, Y_t) and minimises

    L(X_s, Y_s) = 1/(|B| d) * || Y_t - K_ts (K_ss + lambda I)^{-1} Y_s ||_F^2      (lambda: ``ridge``)

then trains the sampled member one SGD step (``inner_lr``) on the synthetic set,
omega <- omega - eta * grad 1/(N d) ||h(f_omega(X_s)) - Y_s||_F^2, and re-initialises it after
``pool_steps`` such steps (the paper's model pool, so the kernel is taken at all stages of training).
The pool is held as frozen submodules of the ``student`` role, so checkpoints carry it and resume is
bitwise.

Output. The images X_s with the class of the real image each started from (int64 hard labels), so the
standard bench (ConvNets trained on the labelled set) applies. The paper's evaluation is transfer; this
method adds it at MNIST scale. A fresh ConvNet-3 of the protocol's width is pretrained on (X_s, Y_s)
by regression (the same epochs, SGD and DSA as the bench; the paper's pretraining objective)

    min_theta 1/(N d) ||f_theta(A(X_s)) - Y_s||_F^2

and then evaluated twice (the card's ``evaluation``):

- ``linear_probe``: frozen, a multinomial logistic regression on its features of the real training
  split is scored on the eval split;
- ``finetune`` (the paper's transfer protocol, Sec. 4): its linear head is replaced by a fresh one to
  the classes and every weight is fine-tuned on a labelled target task by SGD (the authors' settings:
  lr 0.01 cosine-annealed to 0, momentum 0.9, weight decay 5e-4, batch 128, DSA) on the cross-entropy

      min_theta' 1/|L| sum_{(x, c) in L} -log softmax(f_theta'(A(x)))_c,   theta' from (theta, new head)

  and scored on the eval split. The paper fine-tunes on whole target datasets; at MNIST scale the
  target task is a per-class balanced budget L of ``finetune.labels`` real training images per class
  (drawn per seed, never from the eval split), small enough that training from scratch stays well
  below what the features allow (10 labels, 200 epochs: ~92 % against the probe's ~97.6 % on 4000).

Beside the distilled pairs, both are taken after pretraining on a random real subset at the same IPC
with its true targets (``random``) and on an untrained network (``untrained``); per seed one network
per row is pretrained and serves both evaluations. The fine-tuning defaults come from a sweep at
IPC 1 and 10 (benchmarks/results/dataset_distill/cvdd_ssl_dd.md): at 200 epochs every row converges
to the same accuracy; only a shorter fine-tuning (50 epochs) shows a head start of pretraining.
"""

from __future__ import annotations

import hashlib
import json
import math
import time

import numpy as np
import torch
from pydantic import Field, PositiveInt
from safetensors import safe_open
from safetensors.torch import save
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from stillroom.core.errors import StillroomError
from stillroom.core.fsio import write_bytes
from stillroom.core.method import Params, Role, StepOutput
from stillroom.plugins.dataset import bench
from stillroom.plugins.dataset.base import DatasetMethod, DatasetParams
from stillroom.plugins.dataset.convnet import MEAN, STD, STRATEGY, ConvNet, Protocol, augment
from stillroom.plugins.dataset.data import Real, per_class_sample
from stillroom.plugins.dataset.experts import cache_root


class TargetConfig(Params):
    width: PositiveInt = Field(32, description="ConvNet width of the self-supervised target encoder")
    depth: PositiveInt = 3
    projection: PositiveInt = Field(64, description="SimCLR projection dimension")
    epochs: PositiveInt = Field(10, description="SimCLR epochs over the real training split")
    lr: float = Field(0.05, gt=0)
    batch_size: PositiveInt = 256
    temperature: float = Field(0.5, gt=0, description="t of NT-Xent")
    augment: str = STRATEGY


class FinetuneConfig(Params):
    """The transfer protocol: the pretrained ConvNet, with a fresh head, fine-tuned on a few labels."""

    labels: PositiveInt = Field(10, description="labelled real training images per class (target task)")
    epochs: PositiveInt = Field(200, description="fine-tuning epochs over the labelled images")
    lr: float = Field(0.01, gt=0, description="SGD learning rate, cosine-annealed to 0")
    batch_size: PositiveInt = 128


class KRRSTParams(DatasetParams):
    target: TargetConfig = Field(default_factory=TargetConfig)
    finetune: FinetuneConfig = Field(
        default_factory=FinetuneConfig, description="the fine-tuning transfer evaluation"
    )
    ridge: float = Field(1e-3, gt=0, description="lambda of the kernel ridge regression")
    pool_size: PositiveInt = Field(4, description="feature extractors in the model pool")
    pool_steps: PositiveInt = Field(20, description="SGD steps a pool member takes before re-initialisation")
    inner_lr: float = Field(0.05, gt=0, description="SGD learning rate of the pool members")
    feature_width: PositiveInt = Field(32, description="ConvNet width of the pool members")


def embed(net: ConvNet, pixels: torch.Tensor) -> torch.Tensor:
    """The ConvNet's representation: its conv features, flattened (before the linear head)."""
    return net.features((pixels - MEAN) / STD).flatten(1)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss over 2B L2-normalised projections, positives the two views of one image."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf"))
    b = len(z1)
    positives = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(z.device)
    return F.cross_entropy(sim, positives)


def krr_loss(f_t: torch.Tensor, f_s: torch.Tensor, y_t: torch.Tensor, y_s: torch.Tensor, ridge: float):
    """1/(|B| d) ||Y_t - K_ts (K_ss + lambda I)^-1 Y_s||_F^2 with K = F F'^T / D (solved in float64)."""
    d = f_s.shape[1]
    k_ss, k_ts = f_s @ f_s.T / d, f_t @ f_s.T / d
    eye = torch.eye(len(f_s), dtype=f_s.dtype, device=f_s.device)
    pred = k_ts.double() @ torch.linalg.solve((k_ss + ridge * eye).double(), y_s.double())
    return (y_t - pred.to(y_t.dtype)).pow(2).mean()


def target_encoder(real: Real, cfg: TargetConfig) -> tuple[ConvNet, float]:
    """The SimCLR encoder of ``real`` (trained and cached when missing) and the CPU seconds it cost."""
    blob = json.dumps({"source": real.sha256, **cfg.model_dump()}, sort_keys=True)
    path = cache_root() / "ssl" / f"{hashlib.sha256(blob.encode()).hexdigest()[:16]}.safetensors"
    channels, size = real.train_images.shape[1:3]
    net = ConvNet(channels, size, cfg.projection, cfg.width, cfg.depth)
    if not path.is_file():
        started = time.process_time()
        with torch.random.fork_rng():
            _simclr(net, real, cfg)
        cpu = {"cpu_s": f"{time.process_time() - started:.3f}"}
        write_bytes(path, save(net.state_dict(), metadata=cpu))
    with safe_open(str(path), framework="pt") as fh:
        names = fh.keys()  # noqa: SIM118 (a safetensors handle, not a dict)
        net.load_state_dict({name: fh.get_tensor(name) for name in names})
        cpu_s = float((fh.metadata() or {}).get("cpu_s", 0.0))
    return net.requires_grad_(False).eval(), cpu_s


def _simclr(net: ConvNet, real: Real, cfg: TargetConfig) -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
    x = torch.from_numpy(real.train_images)
    view = lambda b: augment(augment(b, cfg.augment, g), cfg.augment, g)  # noqa: E731
    for _ in range(cfg.epochs):
        for batch in torch.split(torch.randperm(len(x), generator=g), cfg.batch_size):
            loss = nt_xent(net(view(x[batch])), net(view(x[batch])), cfg.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


class SyntheticPairs(nn.Module):
    """X_s and Y_s (trainable), the initialising classes, and the model pool (frozen, checkpointed)."""

    def __init__(self, images, targets, labels, pool: list[ConvNet]) -> None:
        super().__init__()
        self.images = nn.Parameter(images.clone())
        self.targets = nn.Parameter(targets.clone())
        self.register_buffer("labels", labels.clone())
        self.pool = nn.ModuleList(pool).requires_grad_(False)
        self.register_buffer("age", torch.zeros(len(pool), dtype=torch.long))


def fit(net: ConvNet, images, targets, loss, run: Protocol | FinetuneConfig, strategy: str, g, anneal=False):
    """Trains ``net`` on loss(net(A(x)), y) for ``run.epochs`` of shuffled ``run.batch_size`` batches (DSA
    A, generator ``g``) by SGD (``run.lr``, momentum 0.9, weight decay 5e-4); ``anneal``: lr cosine-annealed
    to 0 over the run (the paper's fine-tuning), else constant (its pretraining)."""
    opt = torch.optim.SGD(net.parameters(), lr=run.lr, momentum=0.9, weight_decay=5e-4)
    steps = run.epochs * math.ceil(len(images) / run.batch_size)
    cosine = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / steps)) if anneal else 1.0
    )
    for _ in range(run.epochs):
        for pick in torch.split(torch.randperm(len(images), generator=g), run.batch_size):
            error = loss(net(augment(images[pick], strategy, g)), targets[pick])
            opt.zero_grad(set_to_none=True)
            error.backward()
            opt.step()
            cosine.step()


def mse(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The pretraining regression 1/(B d) ||f(x) - y||^2."""
    return (output - targets).pow(2).mean()


def probe_accuracy(net: ConvNet, real: Real, eval_images: int, iterations: int = 100) -> float:
    """Multinomial logistic regression (L-BFGS, full batch) on the frozen features of the real training
    split, standardised; accuracy on the eval split (its first ``eval_images``, 0: all)."""
    net.eval()
    with torch.no_grad():
        feats = [torch.cat([embed(net, c) for c in torch.split(torch.from_numpy(x), 500)])
                 for x in (real.train_images, real.eval_images)]  # fmt: skip
    mean, std = feats[0].mean(0), feats[0].std(0) + 1e-6
    train_f, eval_f = ((f - mean) / std for f in feats)
    y = torch.from_numpy(real.train_labels)
    head = nn.Linear(train_f.shape[1], real.classes)
    opt = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(train_f), y) + 1e-4 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = head(eval_f).argmax(-1).numpy()
    n = eval_images or len(pred)
    return float((pred[:n] == real.eval_labels[:n]).mean())


def pretrained(real: Real, images, targets, protocol: Protocol, seed: int) -> ConvNet:
    """A fresh ConvNet (seeded) pretrained on (images, targets) by regression (images None: untrained)."""
    with torch.enable_grad(), torch.random.fork_rng():
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        channels, size = real.train_images.shape[1:3]
        dim = targets.shape[1] if targets is not None else 1
        net = ConvNet(channels, size, dim, protocol.width, protocol.depth)
        if images is not None:
            fit(net, images, targets, mse, protocol, protocol.augment, g)
        return net


LABEL_DRAW = 1000  # seed s's labels are drawn with LABEL_DRAW + s, apart from the random subset's draw s


def label_budget(real: Real, per_class: int, seed: int) -> np.ndarray:
    """Indices into the real *training* split of ``per_class`` images of every class: the labelled
    target task of the fine-tuning evaluation (the eval split it is scored on is never drawn from)."""
    fewest = int(np.bincount(real.train_labels, minlength=real.classes).min())
    if per_class > fewest:
        raise StillroomError(
            f"fine-tuning asks for {per_class} labelled images per class; the rarest class has {fewest}",
            "lower method.finetune.labels",
        )
    return per_class_sample(real.train_labels, per_class, LABEL_DRAW + seed, real.classes)


def fine_tune(net: ConvNet, images, labels, classes: int, cfg: FinetuneConfig, strategy: str, seed: int):
    """``net`` with a fresh linear head to ``classes``, every weight fine-tuned on (images, labels) by
    cross-entropy (``fit``, cosine-annealed), seeded; returned in place."""
    with torch.enable_grad(), torch.random.fork_rng():
        torch.manual_seed(seed)
        net.classifier = nn.Linear(net.classifier.in_features, classes)
        g = torch.Generator().manual_seed(seed)
        fit(net.train(), images, labels, F.cross_entropy, cfg, strategy, g, anneal=True)
    return net.eval()


def accuracy(net: ConvNet, real: Real, eval_images: int) -> float:
    """Top-1 accuracy of ``net`` on the eval split (its first ``eval_images``, 0: all)."""
    n = eval_images or len(real.eval_labels)
    with torch.no_grad():
        images = torch.from_numpy(real.eval_images[:n])
        pred = torch.cat([net(x).argmax(-1) for x in torch.split(images, 500)])
    return float((pred.numpy() == real.eval_labels[:n]).mean())


def transfer(real: Real, images, targets, budget, protocol: Protocol, cfg: FinetuneConfig, seed: int):
    """(linear probe, fine-tuning) accuracy of one fresh ConvNet pretrained on (images, targets) (None:
    untrained), fine-tuned on the labelled training images ``budget``; seeded."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the probe's head
        net = pretrained(real, images, targets, protocol, seed)
        probe = probe_accuracy(net, real, protocol.eval_images)
    x, y = torch.from_numpy(real.train_images[budget]), torch.from_numpy(real.train_labels[budget])
    tuned = fine_tune(net, x, y, real.classes, cfg, protocol.augment, seed)
    return probe, accuracy(tuned, real, protocol.eval_images)


class KRRST(DatasetMethod):
    name = "ssl_dd"
    description = "kernel ridge regression on self-supervised targets (KRR-ST): images + representations"
    paper = "Lee et al. 2024, Self-Supervised Dataset Distillation for Transfer Learning"
    Params = KRRSTParams

    def build_roles(self) -> dict[str, Role]:
        p, real = self.params, self.real
        encoder, cpu = target_encoder(real, p.target)
        x = torch.from_numpy(real.train_images)
        with torch.no_grad():
            y = torch.cat([embed(encoder, c) for c in torch.split(x, 500)])
        self.real_x, self.real_y = x, (y - y.mean(0)) / (y.std(0) + 1e-6)
        self.extra_card = {"expert_cpu_minutes": round(cpu / 60, 3), "target": p.target.model_dump()}
        pick = per_class_sample(real.train_labels, p.ipc, self.ctx.seed, real.classes)
        label_budget(real, p.finetune.labels, 0)  # a budget the split cannot hold fails before distilling
        channels, size = x.shape[1:3]
        dim = self.real_y.shape[1]
        pool = [ConvNet(channels, size, dim, p.feature_width, 3) for _ in range(p.pool_size)]
        labels = torch.from_numpy(real.train_labels[pick])
        self.synthetic = SyntheticPairs(x[pick], self.real_y[pick], labels, pool).to(self.ctx.device)
        self.chosen = 0
        return {"student": Role(self.synthetic)}

    def dataset(self) -> range:
        return range(len(self.real_x))

    def collate(self, items: list[int]) -> dict[str, torch.Tensor]:
        index = torch.tensor(items, dtype=torch.long)
        return {
            "images": self.real_x[index].to(self.ctx.device),
            "targets": self.real_y[index].to(self.ctx.device),
        }

    def loss(self, role: str, batch, step: int) -> StepOutput:
        syn = self.synthetic
        self.chosen = int(torch.randint(len(syn.pool), (1,)))
        net = syn.pool[self.chosen]
        with torch.no_grad():
            f_t = embed(net, batch["images"])
        loss = krr_loss(f_t, embed(net, syn.images), batch["targets"], syn.targets, self.params.ridge)
        return StepOutput(loss, {"krr": loss.item()})

    def after_step(self, step: int, metrics: dict[str, float]) -> None:
        """One SGD step of the sampled pool member on (X_s, Y_s); re-initialised after ``pool_steps``."""
        p, syn = self.params, self.synthetic
        net = syn.pool[self.chosen]
        with torch.enable_grad():
            weights = {n: w.detach().requires_grad_(True) for n, w in net.named_parameters()}
            out = functional_call(net, weights, (syn.images.detach(),))
            mse = (out - syn.targets.detach()).pow(2).mean()
            grads = torch.autograd.grad(mse, list(weights.values()))
        with torch.no_grad():
            for w, g in zip(net.parameters(), grads, strict=True):
                w.sub_(p.inner_lr * g)
            syn.age[self.chosen] += 1
            if int(syn.age[self.chosen]) >= p.pool_steps:
                for module in net.modules():
                    if hasattr(module, "reset_parameters"):
                        module.reset_parameters()
                syn.age[self.chosen] = 0

    def distilled(self) -> tuple[np.ndarray, np.ndarray]:
        images = self.synthetic.images.detach().clamp(0, 1).cpu().numpy().astype(np.float32)
        return images, self.synthetic.labels.cpu().numpy().astype(np.int64)

    def evaluate(self, student: torch.nn.Module) -> dict[str, float]:
        """The bench's accuracy, then the linear probe and the fine-tuning transfer of the distilled pairs
        beside their baselines: per seed, one pretrained network per row serves both."""
        result = super().evaluate(student)
        started = time.process_time()
        real, protocol, p = self.real, self.params.eval, self.params
        images = self.synthetic.images.detach().clamp(0, 1).cpu()
        targets = self.synthetic.targets.detach().cpu()
        probe, tuned = ({"distilled": [], "random": [], "untrained": []} for _ in range(2))
        for seed in range(protocol.seeds):
            pick = torch.from_numpy(per_class_sample(real.train_labels, p.ipc, seed, real.classes))
            budget = label_budget(real, p.finetune.labels, seed)
            pairs = {
                "distilled": (images, targets),
                "random": (self.real_x[pick], self.real_y[pick]),
                "untrained": (None, None),
            }
            for name, (x, y) in pairs.items():
                accuracies = transfer(real, x, y, budget, protocol, p.finetune, seed)
                probe[name].append(accuracies[0])
                tuned[name].append(accuracies[1])
        self.evaluation["linear_probe"] = {name: bench.figures(acc) for name, acc in probe.items()}
        self.evaluation["finetune"] = {name: bench.figures(acc) for name, acc in tuned.items()}
        self._eval_cpu += time.process_time() - started
        return {
            **result,
            "probe_accuracy": self.evaluation["linear_probe"]["distilled"]["accuracy"],
            "finetune_accuracy": self.evaluation["finetune"]["distilled"]["accuracy"],
        }
