"""The dataset family: artifact format, the MTT and rethink_pca objectives against independent
computations, ConvNet-3 evaluation determinism, resume after a kill, and `stillroom run` / `inspect` /
`bench` end to end on a tiny real subset (tiny networks, few steps)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from stillroom.cli import main
from stillroom.plugins.dataset import artifact, data
from stillroom.plugins.dataset.convnet import ConvNet, Protocol, augment, train_and_evaluate
from stillroom.plugins.dataset.methods import mtt, rethink_pca

TINY_EVAL = "method.eval.seeds=2 method.eval.epochs=2 method.eval.full_epochs=1 method.eval.width=4"
TINY = {
    "mtt": f"method.ipc=2 method.syn_steps=2 method.max_start_epoch=1 method.expert_epochs=1 "
    f"method.experts.count=1 method.experts.epochs=2 method.experts.width=4 train.steps=4 {TINY_EVAL}",
    "rethink_pca": f"method.ipc=2 method.factor=2 method.keep_ratio=0.75 method.scorer_width=4 "
    f"train.steps=4 train.batch_size=32 {TINY_EVAL}",
}


@pytest.fixture
def source(tmp_path_factory, monkeypatch):
    """12 train / 5 eval images per class of the shipped MNIST, and a private evaluation cache."""
    monkeypatch.setenv("STILLROOM_CACHE", str(tmp_path_factory.mktemp("cache")))
    real = data.load("embedded:mnist")
    pick = data.per_class_sample(real.train_labels, 12, 0, 10)
    held = data.per_class_sample(real.eval_labels, 5, 0, 10)
    path = tmp_path_factory.mktemp("src") / "tiny.npz"
    to8 = lambda x: (x[:, 0] * 255).round().astype(np.uint8)  # noqa: E731
    np.savez(path, train_images=to8(real.train_images[pick]), train_labels=real.train_labels[pick],
             eval_images=to8(real.eval_images[held]), eval_labels=real.eval_labels[held])  # fmt: skip
    return str(path)


def run_cli(*args: str) -> None:
    try:
        main(list(args))
    except SystemExit as exit_:
        assert exit_.code in (0, None), f"stillroom {' '.join(args)} exited {exit_.code}"


def recipe_run(method: str, ipc: int, source: str, out, extra: str = "") -> None:
    overrides = f"{TINY[method]} data.source={source} {extra}".split()
    run_cli("run", f"mnist-dd-{method}-ipc{ipc}", "--out", str(out), *overrides)


# -- artifact -----------------------------------------------------------------------------------------
def test_artifact_round_trips_hard_and_soft_labels_and_writes_the_card_last(tmp_path, monkeypatch):
    images = np.random.default_rng(0).random((4, 1, 6, 6), dtype=np.float32)
    for labels in (np.array([0, 1, 1, 0]), np.eye(2, dtype=np.float32)[[0, 1, 1, 0]]):
        artifact.write(tmp_path / "ds", images, labels, {"method": "x", "ipc": 2})
        got_images, got_labels, card = artifact.read(tmp_path / "ds")
        assert got_images.dtype == np.float32 and np.array_equal(got_images, images)
        assert got_labels.dtype == labels.dtype and np.array_equal(got_labels, labels)
        assert card["kind"] == artifact.KIND and card["soft_labels"] == (labels.ndim == 2)
        assert (tmp_path / "ds" / artifact.GRID).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        artifact.write(tmp_path / "bad", images * 2, np.zeros(4, np.int64), {})
    # a write that dies before the card leaves a folder nobody takes for a dataset
    monkeypatch.setattr(artifact, "grid_png", lambda *_: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        artifact.write(tmp_path / "torn", images, np.zeros(4, np.int64), {})
    assert (tmp_path / "torn" / artifact.DATA).is_file() and not artifact.is_dataset_dir(tmp_path / "torn")
    np.savez(tmp_path / "ds" / artifact.DATA, images=images[:2], labels=np.zeros(2, np.int64))
    with pytest.raises(Exception, match="does not match its card"):
        artifact.read(tmp_path / "ds")


# -- objectives against independent computations -------------------------------------------------------
def test_mtt_loss_is_the_normalised_parameter_distance_of_eq_2():
    rng = np.random.default_rng(1)
    end, target, start = (rng.normal(size=7) for _ in range(3))
    expected = np.sum((end - target) ** 2) / np.sum((start - target) ** 2)
    got = mtt.matching_loss(*(torch.from_numpy(v) for v in (end, target, start)))
    assert math.isclose(float(got), expected, rel_tol=1e-12)


def test_mtt_unroll_is_plain_sgd_and_differentiates_into_images_and_lr():
    torch.manual_seed(0)
    net = ConvNet(1, 8, 3, width=4, depth=2)
    images = torch.rand(6, 1, 8, 8, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    lr = torch.tensor(0.1, requires_grad=True)
    start = torch.nn.utils.parameters_to_vector(net.parameters()).detach()
    end = mtt.unroll(net, start, images, labels, lr, 2, 0, "", torch.Generator().manual_seed(0))
    # the same two full-batch SGD steps on an ordinary module, by torch.optim
    reference = ConvNet(1, 8, 3, width=4, depth=2)
    reference.load_state_dict(net.state_dict())
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(reference(images.detach()), labels).backward()
        opt.step()
    want = torch.nn.utils.parameters_to_vector(reference.parameters())
    assert torch.allclose(end.detach(), want, atol=1e-6)
    mtt.matching_loss(end, want.detach() + 0.01, start).backward()
    assert images.grad.abs().sum() > 0 and lr.grad.abs() > 0


def test_rethink_pca_prunes_the_easiest_and_tiles_downscaled_images():
    scores = np.array([0.9, 0.1, 0.5, 0.3, 0.2, 0.8])
    labels = np.array([0, 0, 0, 1, 1, 1])
    assert sorted(rethink_pca.prune(scores, labels, 0.67, 2).tolist()) == [1, 2, 3, 4]
    x = torch.rand(8, 1, 4, 4)
    tiled = rethink_pca.combine(x, 2)
    assert tiled.shape == (2, 1, 4, 4)
    pooled = x.view(8, 1, 2, 2, 2, 2).mean((3, 5))  # 2x2 area means, computed by hand
    for g in range(2):
        for i in range(2):
            for j in range(2):
                assert torch.allclose(
                    tiled[g, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2], pooled[4 * g + 2 * i + j]
                )


def test_convnet3_is_the_papers_network_and_evaluation_is_seeded_and_deterministic(source):
    net = ConvNet(1, 28, 10)
    assert net.features(torch.zeros(1, 1, 28, 28)).shape == (1, 128, 4, 4)
    assert (
        sum(isinstance(m, nn.GroupNorm) and m.num_groups == m.num_channels == 128 for m in net.modules()) == 3
    )
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 28, 28, requires_grad=True)
    augment(x, "color_crop_cutout_scale_rotate", g).sum().backward()
    assert x.grad is not None
    real = data.load(source)
    p = Protocol(width=4, epochs=3)
    train, test = (real.train_images, real.train_labels), (real.eval_images, real.eval_labels)
    runs = [train_and_evaluate(*train, *test, p, seed, 3, 10) for seed in (0, 0, 1)]
    assert runs[0] == runs[1] and 0 <= runs[2] <= 1


# -- end to end -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["mtt", "rethink_pca"])
def test_stillroom_run_writes_a_dataset_that_inspect_and_bench_read(method, source, tmp_path, capsys):
    recipe_run(method, 10, source, tmp_path / "run")
    out = tmp_path / "run" / "student"
    images, labels, card = artifact.read(out)
    assert (
        images.shape == (20, 1, 28, 28)
        and labels.dtype == np.int64
        and np.bincount(labels).tolist() == [2] * 10
    )
    assert (
        card["method"] == method and card["ipc"] == 2 and card["source"]["sha256"] == data.load(source).sha256
    )
    assert len(card["evaluation"]["accuracies"]) == 2 and card["cpu_minutes"] >= 0
    assert not (tmp_path / "run" / "artifact").exists()  # a dataset is its own artifact
    report = json.loads((tmp_path / "run" / "bench" / "report.json").read_text())
    assert set(report["rows"]) == {"distilled", "full", "random"}
    assert report["rows"]["distilled"]["accuracies"] == card["evaluation"]["accuracies"]
    capsys.readouterr()
    run_cli("inspect", str(out), "--json")
    assert json.loads(capsys.readouterr().out)["method"] == method
    run_cli("bench", str(out), "--out", str(tmp_path / "again"))
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    for name, row in again["rows"].items():  # every figure came from the cache: nothing retrained
        assert row["accuracies"] == report["rows"][name]["accuracies"] and row["cpu_s"] == 0


def test_an_mtt_run_killed_mid_synthesis_resumes_to_the_same_dataset(source, tmp_path, monkeypatch):
    recipe_run("mtt", 1, source, tmp_path / "full", "train.checkpoint_every=2")
    loss = mtt.MTT.loss

    def dies_at_step_3(self, role, batch, step):
        if step == 3:
            raise KeyboardInterrupt
        return loss(self, role, batch, step)

    monkeypatch.setattr(mtt.MTT, "loss", dies_at_step_3)
    with pytest.raises(AssertionError, match="exited 130"):  # interrupted
        recipe_run("mtt", 1, source, tmp_path / "part", "train.checkpoint_every=2")
    assert not (tmp_path / "part" / "student").exists()
    monkeypatch.setattr(mtt.MTT, "loss", loss)
    run_cli("run", "mnist-dd-mtt-ipc1", "--out", str(tmp_path / "part"), "--resume",
            *f"{TINY['mtt']} data.source={source} train.checkpoint_every=2".split())  # fmt: skip
    a, _, card_a = artifact.read(tmp_path / "full" / "student")
    b, _, card_b = artifact.read(tmp_path / "part" / "student")
    assert np.array_equal(a, b) and card_a["data_sha256"] == card_b["data_sha256"]
