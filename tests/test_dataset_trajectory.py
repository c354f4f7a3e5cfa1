"""The trajectory-matching variants of the dataset family (ftd, datm, shq): what distinguishes each from
MTT against an independent computation (SAM and clipped expert steps by hand, the EMA recursion in
float64, DATM's window table and its soft labels from the trained experts' logits, k-means-nearest
initialisation, balanced minibatches), the projection of the images onto [0, 1] after every step, the
unchanged cache key of plain experts, resume, and `stillroom run` end to end."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.func import functional_call
from torch.nn import functional as F

from stillroom import pipeline
from stillroom.core.method import Context
from stillroom.plugins.dataset import artifact, data, experts
from stillroom.plugins.dataset.experts import ExpertConfig
from stillroom.plugins.dataset.methods import datm, ftd, mtt, shq
from tests.test_dataset_family import TINY_EVAL, run_cli, source  # noqa: F401 (the fixture)

TINY_MTT = (
    "method.ipc=2 method.syn_steps=2 method.expert_epochs=1 method.experts.count=1 method.experts.epochs=2 "
    f"method.experts.width=4 train.steps=4 {TINY_EVAL}"
)
TINY = {
    "mtt": f"{TINY_MTT} method.max_start_epoch=1",
    "ftd": f"{TINY_MTT} method.max_start_epoch=1 method.ema_decay=0.5",
    "datm": f"{TINY_MTT} method.experts.epochs=3 method.min_start_epoch=0 method.initial_max_start_epoch=1 "
    "method.max_start_epoch=2",
    "shq": f"{TINY_MTT} method.max_start_epoch=1 method.batch_syn=10",
}


@pytest.fixture
def src(source):  # noqa: F811 (the shared fixture: 12 train / 5 eval MNIST images per class)
    return source


def tiny_real(n_per_class: int = 4, classes: int = 3, size: int = 8) -> data.Real:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(classes), n_per_class)
    images = rng.random((len(labels), 1, size, size), dtype=np.float32)
    return data.Real("tiny", "0" * 64, images, labels, images, labels)


def loss_at(net, theta: torch.Tensor, real: data.Real) -> torch.Tensor:
    x, y = torch.from_numpy(real.train_images).double(), torch.from_numpy(real.train_labels)
    return F.cross_entropy(functional_call(net, mtt.unflatten(net, theta), (x,)), y)


def first_step(cfg: ExpertConfig) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module, data.Real]:
    """An expert's first step (one full batch per epoch, no augmentation), and a float64 twin net."""
    real = tiny_real()
    points = experts.train_expert(real, cfg, 0)
    net = experts.network(real, cfg.width, cfg.depth).double()
    return points[0].double(), points[1].double(), net, real


def grad(net, theta: torch.Tensor, real: data.Real) -> torch.Tensor:
    theta = theta.clone().requires_grad_(True)
    return torch.autograd.grad(loss_at(net, theta, real), theta)[0]


def build(method: str, ipc: int, src: str, tmp_path: Path, extra: str = ""):
    overrides = f"{TINY[method]} method.ipc={ipc} data.source={src} {extra}".split()
    recipe = pipeline.load_recipe(f"mnist-dd-{method}-ipc1", overrides)
    torch.manual_seed(0)
    ctx = Context(torch.device("cpu"), torch.float32, tmp_path, seed=0)
    instance = {"mtt": mtt.MTT, "ftd": ftd.FTD, "datm": datm.DATM, "shq": shq.SHQ}[method](recipe, ctx)
    instance.roles = instance.build()
    return instance


# -- experts ------------------------------------------------------------------------------------------
def test_sam_expert_step_uses_the_gradient_at_the_perturbed_weights():
    rho, lr = 0.5, 0.1
    cfg = ExpertConfig(count=1, epochs=1, lr=lr, batch_size=64, width=4, depth=2, augment="", sam_rho=rho)
    theta0, theta1, net, real = first_step(cfg)
    g = grad(net, theta0, real)
    want = theta0 - lr * grad(net, theta0 + rho * g / g.norm(), real)
    assert torch.allclose(theta1, want, atol=1e-5)
    assert not torch.allclose(theta1, theta0 - lr * g, atol=1e-5)  # not plain SGD


def test_clipped_expert_steps_move_at_most_lr_times_clip():
    clip, lr = 0.05, 0.1
    cfg = ExpertConfig(count=1, epochs=1, lr=lr, batch_size=64, width=4, depth=2, augment="", clip=clip)
    theta0, theta1, net, real = first_step(cfg)
    g = grad(net, theta0, real)
    assert g.norm() > clip  # the clip binds
    assert torch.allclose(theta1, theta0 - lr * g * clip / g.norm(), atol=1e-6)
    assert abs(float((theta1 - theta0).norm()) - lr * clip) < 1e-6


def test_plain_experts_keep_their_cache_folder_and_variants_get_their_own():
    real = tiny_real()
    cfg = ExpertConfig(count=3, epochs=4, width=32)
    fields = {k: v for k, v in cfg.model_dump().items() if k not in ("sam_rho", "clip")}  # the old key
    old = hashlib.sha256(json.dumps({"source": real.sha256, **fields}, sort_keys=True).encode()).hexdigest()
    assert experts.folder(real, cfg).name == old[:16]
    variants = {experts.folder(real, cfg.model_copy(update=u)) for u in ({"sam_rho": 0.05}, {"clip": 1.0})}
    assert len(variants | {experts.folder(real, cfg)}) == 3


# -- mtt ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["mtt", "ftd"])
def test_images_are_projected_onto_pixels_after_every_step_so_the_matched_set_is_the_shipped_one(
    method, src, tmp_path
):
    instance = build(method, 1, src, tmp_path, "method.ema_decay=0.0" if method == "ftd" else "")
    syn = instance.synthetic
    opt = torch.optim.SGD([syn.images], lr=1e4)  # a step that throws pixels far out of [0, 1]
    instance.loss("student", [(0, 0)], 0).loss.backward()
    moved = syn.images.detach() - 1e4 * syn.images.grad
    assert moved.min() < -0.5 and moved.max() > 1.5
    opt.step()
    instance.after_step(0, {})
    assert torch.allclose(syn.images.detach(), moved.clamp(0, 1), atol=1e-5)  # the projection, nothing else
    images, _ = instance.distilled()
    assert np.array_equal(images, syn.images.detach().numpy())  # what the next match trains on


def test_representative_init_is_available_to_every_trajectory_method(src, tmp_path):
    method = build("mtt", 3, src, tmp_path, "method.init=representative")
    real = method.real
    pick = mtt.representative(real.train_images, real.train_labels, 3, real.classes, seed=0)
    assert np.array_equal(method.synthetic.images.detach().numpy(), real.train_images[pick])


# -- ftd ----------------------------------------------------------------------------------------------
def test_ftd_distils_the_ema_of_the_synthetic_images(src, tmp_path):
    beta = 0.5
    method = build("ftd", 1, src, tmp_path, f"method.ema_decay={beta}")
    syn = method.synthetic
    opt = torch.optim.SGD(syn.parameters(), lr=50.0)  # big steps: the images move visibly
    ema = syn.images.detach().double().clone()
    for k in range(3):
        method.loss("student", [(0, 0)], k).loss.backward()
        opt.step()
        opt.zero_grad()
        method.after_step(k, {})
        ema = beta * ema + (1 - beta) * syn.images.detach().double()
    images, labels = method.distilled()
    assert np.allclose(images, ema.clamp(0, 1).numpy(), atol=1e-6)
    assert not np.allclose(images, syn.images.detach().clamp(0, 1).numpy(), atol=1e-3)
    assert labels.dtype == np.int64 and method.params.experts.sam_rho > 0


# -- datm ---------------------------------------------------------------------------------------------
def test_datm_window_grows_from_t_to_t_plus_by_the_expansion_end():
    p = datm.DATMParams(
        min_start_epoch=1,
        initial_max_start_epoch=2,
        max_start_epoch=5,
        expansion_end=0.5,
        experts={"epochs": 8},
    )
    # T(k) = 2 + floor(3 * min(1, k / 5)) for 10 outer steps, by hand
    want = [2, 2, 3, 3, 4, 5, 5, 5, 5, 5]
    assert [datm.window(k, 10, p) for k in range(10)] == [(1, w) for w in want]
    with pytest.raises(ValueError):
        datm.DATMParams(min_start_epoch=2, initial_max_start_epoch=2, max_start_epoch=4)


def test_datm_soft_labels_start_as_the_mean_logits_of_the_trained_experts_that_are_right(src, tmp_path):
    """DATM's code: the experts at their last epoch (Label_Model_Timestamp = -1), images expert 0
    classifies correctly, logits averaged over the experts right on each image."""
    method = build("datm", 3, src, tmp_path, "method.experts.count=3")
    real, syn = method.real, method.synthetic
    nets = []
    for trajectory in method.trajectories:  # independent: plain modules loaded with the last epoch
        net = experts.network(real, 4, 3)
        torch.nn.utils.vector_to_parameters(trajectory[-1], net.parameters())
        nets.append(net)
    with torch.no_grad():
        correct = nets[0](torch.from_numpy(real.train_images)).argmax(-1).numpy() == real.train_labels
        per_expert = torch.stack([net(syn.images) for net in nets]).double()  # [E, N, K]
    y = syn.labels.numpy()
    want = torch.zeros(len(y), 10, dtype=torch.float64)
    for i in range(len(y)):
        right = [e for e in range(3) if per_expert[e, i].argmax() == y[i]] or [0, 1, 2]
        want[i] = per_expert[right, i].mean(0)
    assert torch.allclose(syn.targets().double(), torch.softmax(want, -1), atol=1e-5)
    predicted = per_expert[0].argmax(-1).numpy() == y
    for c in range(real.classes):  # images expert 0 gets right first, as many as the class has
        assert predicted[y == c].sum() == min(3, correct[real.train_labels == c].sum())
    assert not torch.allclose(per_expert[0], per_expert[1])  # the experts differ: the mean is a mean
    method.loss("student", [(0, 0)], 0).loss.backward()
    assert syn.w.grad.abs().sum() > 0 and syn.images.grad.abs().sum() > 0
    _, labels = method.distilled()
    assert labels.dtype == np.float32 and labels.shape == (30, 10) and np.allclose(labels.sum(1), 1)


# -- shq ----------------------------------------------------------------------------------------------
def test_shq_representative_init_is_the_real_image_nearest_each_centroid():
    real = tiny_real(n_per_class=6)
    one = mtt.representative(real.train_images, real.train_labels, 1, 3, seed=0)
    for c, i in enumerate(one):  # k = 1: the centroid is the class mean
        members = np.flatnonzero(real.train_labels == c)
        flat = real.train_images[members].reshape(len(members), -1).astype(np.float64)
        assert i == members[np.argmin(((flat - flat.mean(0)) ** 2).sum(1))]
    three = mtt.representative(real.train_images, real.train_labels, 3, 3, seed=0)
    assert len(set(three.tolist())) == 9 and (real.train_labels[three] == np.repeat(np.arange(3), 3)).all()


def test_shq_inner_minibatches_hold_every_class_equally(src, tmp_path):
    method = build("shq", 4, src, tmp_path)
    gen = torch.Generator().manual_seed(0)
    labels = method.synthetic.labels
    for _ in range(5):
        pick = method.minibatch(20, gen)
        assert np.bincount(labels[pick].numpy(), minlength=10).tolist() == [2] * 10
        assert len(set(pick.tolist())) == 20
    assert method.params.experts.clip > 0 and method.params.init == "representative"


# -- end to end ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["ftd", "datm", "shq"])
def test_stillroom_run_writes_each_variants_dataset(method, src, tmp_path):
    run_cli("run", f"mnist-dd-{method}-ipc1", "--out", str(tmp_path / "run"),
            *f"{TINY[method]} data.source={src}".split())  # fmt: skip
    images, labels, card = artifact.read(tmp_path / "run" / "student")
    assert images.shape == (20, 1, 28, 28) and card["method"] == method
    assert card["soft_labels"] == (method == "datm") and len(card["evaluation"]["accuracies"]) == 2
    if method == "datm":
        assert labels.shape == (20, 10) and "init_correct" in card


@pytest.mark.parametrize("method", ["ftd", "datm"])
def test_a_killed_run_resumes_to_the_same_dataset(method, src, tmp_path, monkeypatch):
    """FTD's EMA buffer and DATM's start epochs / label logits survive a resume bitwise."""
    args = f"{TINY[method]} data.source={src} train.checkpoint_every=2".split()
    run_cli("run", f"mnist-dd-{method}-ipc1", "--out", str(tmp_path / "full"), *args)
    loss = mtt.MTT.loss

    def dies_at_step_3(self, role, batch, step):
        if step == 3:
            raise KeyboardInterrupt
        return loss(self, role, batch, step)

    monkeypatch.setattr(mtt.MTT, "loss", dies_at_step_3)
    with pytest.raises(AssertionError, match="exited 130"):
        run_cli("run", f"mnist-dd-{method}-ipc1", "--out", str(tmp_path / "part"), *args)
    monkeypatch.setattr(mtt.MTT, "loss", loss)
    run_cli("run", f"mnist-dd-{method}-ipc1", "--out", str(tmp_path / "part"), "--resume", *args)
    a, la, _ = artifact.read(tmp_path / "full" / "student")
    b, lb, _ = artifact.read(tmp_path / "part" / "student")
    assert np.array_equal(a, b) and np.array_equal(la, lb)
