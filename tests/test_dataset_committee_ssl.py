"""The dataset family's cvdd (committee voting) and ssl_dd (KRR-ST) methods: their objectives against
independent numpy computations, and `stillroom run` end to end on a tiny real subset."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from stillroom.core.errors import StillroomError
from stillroom.plugins.dataset import artifact, data
from stillroom.plugins.dataset.convnet import MEAN, STD, STRATEGY, ConvNet, Protocol
from stillroom.plugins.dataset.methods import cvdd, ssl_dd
from tests.test_dataset_family import TINY_EVAL, run_cli, source  # noqa: F401 (the fixture)


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def members(n: int) -> list[ConvNet]:
    torch.manual_seed(0)
    return [ConvNet(1, 8, 3, width=4, depth=1) for _ in range(n)]


# -- cvdd ---------------------------------------------------------------------------------------------
def test_cvdd_vote_is_the_prior_weighted_mean_of_tempered_softmaxes():
    nets, x = members(3), torch.rand(5, 1, 8, 8)
    performance = np.array([0.9, 0.8, 0.5])
    alphas = cvdd.prior_weights(torch.tensor(performance), 0.1)
    want_alpha = np.exp(performance / 0.1) / np.exp(performance / 0.1).sum()
    assert np.allclose(alphas.numpy(), want_alpha)
    got = cvdd.vote(nets, alphas.float(), x, 2.0).numpy()
    logits = [n(x).detach().numpy() for n in nets]
    want = sum(a * np_softmax(z / 2.0) for a, z in zip(want_alpha, logits, strict=True))
    assert np.allclose(got, want, atol=1e-6) and np.allclose(got.sum(1), 1, atol=1e-6)


def test_cvdd_synthesis_loss_is_weighted_ce_plus_the_statistics_distance():
    nets, x, y = members(2), torch.rand(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    real = torch.rand(20, 1, 8, 8)
    alphas = torch.tensor([0.3, 0.1])

    def conv_out(net, images):  # the input of the single GroupNorm: conv of the normalised pixels, by hand
        conv = net.features[0]
        return F.conv2d((images - MEAN) / STD, conv.weight, conv.bias, padding=1).detach().numpy()

    stats = [cvdd.statistics(n, real, chunk=7) for n in nets]  # chunked: pooled moments must be exact
    want, w = 0.0, alphas.numpy() / alphas.numpy().sum()
    for net, wi, (((mu_r, var_r),)) in zip(nets, w, stats, strict=True):
        h_real = conv_out(net, real)
        assert np.allclose(mu_r.numpy(), h_real.mean((0, 2, 3)), atol=1e-5)
        assert np.allclose(var_r.numpy(), h_real.var((0, 2, 3)), atol=1e-4)
        h = conv_out(net, x)
        r = np.linalg.norm(h.mean((0, 2, 3)) - h_real.mean((0, 2, 3))) + np.linalg.norm(
            h.var((0, 2, 3)) - h_real.var((0, 2, 3))
        )
        logp = np.log(np_softmax(net(x).detach().numpy().astype(np.float64)))
        ce = -logp[np.arange(6), y.numpy()].mean()
        want += wi * (ce + 0.5 * r)
    x.requires_grad_(True)
    got, metrics = cvdd.synthesis_loss(nets, stats, alphas, x, y, 0.5)
    assert np.isclose(float(got.detach()), want, rtol=1e-4) and metrics["stat"] > 0
    got.backward()
    assert x.grad.abs().sum() > 0


# -- ssl_dd -------------------------------------------------------------------------------------------
def test_krr_st_loss_matches_numpy_kernel_ridge_regression():
    rng = np.random.default_rng(0)
    f_t, f_s, y_t, y_s = (rng.normal(size=shape) for shape in ((7, 5), (3, 5), (7, 4), (3, 4)))
    k_ss, k_ts = f_s @ f_s.T / 5, f_t @ f_s.T / 5
    pred = k_ts @ np.linalg.inv(k_ss + 0.1 * np.eye(3)) @ y_s
    want = np.sum((y_t - pred) ** 2) / (7 * 4)
    got = ssl_dd.krr_loss(*(torch.from_numpy(a) for a in (f_t, f_s, y_t, y_s)), 0.1)
    assert np.isclose(float(got), want, rtol=1e-10)
    # with no ridge and the synthetic set itself as the target batch, KRR interpolates: loss ~ 0
    f, y = torch.from_numpy(f_s), torch.from_numpy(y_s)
    exact = ssl_dd.krr_loss(f, f, y, y, 1e-9)
    assert float(exact) < 1e-6


def test_simclr_nt_xent_matches_a_loop_over_views():
    rng = np.random.default_rng(1)
    z1, z2 = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    z = np.concatenate([z1, z2])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    losses = []
    for k in range(8):
        pos = (k + 4) % 8
        others = [m for m in range(8) if m != k]
        losses.append(-z[k] @ z[pos] / 0.5 + np.log(sum(np.exp(z[k] @ z[m] / 0.5) for m in others)))
    got = ssl_dd.nt_xent(torch.from_numpy(z1), torch.from_numpy(z2), 0.5)
    assert np.isclose(float(got), np.mean(losses), rtol=1e-10)


def test_krr_st_label_budget_is_balanced_seeded_and_drawn_from_the_training_split_only():
    real = data.load("embedded:mnist")
    budget = ssl_dd.label_budget(real, 10, 0)
    assert np.bincount(real.train_labels[budget], minlength=10).tolist() == [10] * 10
    assert len(set(budget.tolist())) == 100 and budget.max() < len(real.train_labels)
    assert np.array_equal(budget, ssl_dd.label_budget(real, 10, 0))
    assert not np.array_equal(budget, ssl_dd.label_budget(real, 10, 1))
    # not the random real subset's draw of the same seed (which the `random` row pretrains on)
    assert not np.array_equal(np.sort(budget), np.sort(data.per_class_sample(real.train_labels, 10, 0, 10)))
    held_out = {image.tobytes() for image in real.eval_images}
    assert not any(image.tobytes() in held_out for image in real.train_images[budget])
    with pytest.raises(StillroomError, match=r"method\.finetune\.labels"):
        ssl_dd.label_budget(real, 10_000, 0)


def tiny_transfer(path: str):
    real = data.load(path)
    protocol = Protocol(seeds=1, epochs=2, width=4, batch_size=16)
    pick = data.per_class_sample(real.train_labels, 1, 0, 10)
    targets = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
    pairs = torch.from_numpy(real.train_images[pick]), targets
    finetune = ssl_dd.FinetuneConfig(labels=4, epochs=2, batch_size=16)
    return real, protocol, pairs, finetune


def test_krr_st_fine_tuning_is_seeded_and_trains_every_weight_under_a_new_head(source):  # noqa: F811
    real, protocol, (x, y), finetune = tiny_transfer(source)
    net = ssl_dd.pretrained(real, x, y, protocol, 0)
    budget = ssl_dd.label_budget(real, finetune.labels, 0)
    images, labels = torch.from_numpy(real.train_images[budget]), torch.from_numpy(real.train_labels[budget])
    tune = lambda seed: ssl_dd.fine_tune(copy.deepcopy(net), images, labels, 10, finetune, STRATEGY, seed)  # noqa: E731
    a, b, c = tune(0).state_dict(), tune(0).state_dict(), tune(1).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert a["classifier.weight"].shape == (10, net.classifier.in_features)
    assert not torch.equal(a["features.0.weight"], net.state_dict()["features.0.weight"])  # all of it trains
    assert ssl_dd.transfer(real, x, y, budget, protocol, finetune, 0) == ssl_dd.transfer(
        real, x, y, budget, protocol, finetune, 0
    )


def test_krr_st_fine_tuning_starts_from_the_pretrained_network(source, monkeypatch):  # noqa: F811
    """What fine-tuning starts from is the pretrained network: (1) its weights on entry are those of
    an independent ``pretrained`` call; (2) a pretrained network with dead features (all weights 0:
    every ReLU input is 0, so no gradient reaches them) stays dead, only the head learns and every eval
    image gets one class; a fine-tuning that re-initialised the network would start from a live one."""
    real, protocol, (x, y), finetune = tiny_transfer(source)
    budget = ssl_dd.label_budget(real, finetune.labels, 0)
    pretrained, fine_tune, entered, tuned = ssl_dd.pretrained, ssl_dd.fine_tune, [], []

    def spy(net, *args):
        entered.append(copy.deepcopy(net.features.state_dict()))
        tuned.append(fine_tune(net, *args))
        return tuned[-1]

    monkeypatch.setattr(ssl_dd, "fine_tune", spy)
    ssl_dd.transfer(real, x, y, budget, protocol, finetune, 0)
    want = pretrained(real, x, y, protocol, 0).features.state_dict()
    assert all(torch.equal(entered[0][k], want[k]) for k in want)
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the init that pretraining started from
        fresh = ConvNet(1, 28, 3, protocol.width, protocol.depth).features.state_dict()
    assert all(fresh[k].shape == want[k].shape for k in want)
    assert not all(torch.equal(entered[0][k], fresh[k]) for k in fresh)  # the trained weights, not the init

    def dead(*args):
        net = pretrained(*args)
        with torch.no_grad():
            for w in net.features.parameters():
                w.zero_()
        return net

    monkeypatch.setattr(ssl_dd, "pretrained", dead)
    _, acc = ssl_dd.transfer(real, x, y, budget, protocol, finetune, 0)
    net = tuned[-1]
    assert all(not w.any() for w in net.features.parameters()) and net.classifier.bias.any()
    predictions = net(torch.from_numpy(real.eval_images)).argmax(-1)
    assert len(predictions.unique()) == 1 and acc == np.mean(real.eval_labels == int(predictions[0])) == 0.1


# -- end to end -------------------------------------------------------------------------------------------
TINY = {
    "cvdd": 'method.committee=[{"count":1,"epochs":1,"width":4,"depth":2}] '
    "method.members_per_step=1 train.steps=3",
    "ssl_dd": "method.target.epochs=1 method.target.width=4 method.feature_width=4 method.pool_size=2 "
    "method.pool_steps=2 train.steps=3 train.batch_size=16 method.finetune.labels=2 method.finetune.epochs=2",
}


def test_cvdd_and_ssl_dd_runs_write_datasets_and_krr_st_reports_its_transfer(source, tmp_path):  # noqa: F811
    for method in ("cvdd", "ssl_dd"):
        out = tmp_path / method
        run_cli("run", f"mnist-dd-{method}-ipc1", "--out", str(out), f"data.source={source}",
                *f"method.ipc=2 {TINY[method]} {TINY_EVAL}".split())  # fmt: skip
        images, labels, card = artifact.read(out / "student")
        assert images.shape == (20, 1, 28, 28) and card["method"] == method
        report = json.loads((out / "bench" / "report.json").read_text())
        assert report["rows"]["distilled"]["accuracies"] == card["evaluation"]["accuracies"]
        if method == "cvdd":  # soft labels: the committee's vote, one distribution per image
            assert labels.shape == (20, 10) and labels.dtype == np.float32
            assert np.allclose(labels.sum(1), 1, atol=1e-5) and len(card["committee_weights"]) == 1
        else:
            assert labels.dtype == np.int64 and np.bincount(labels).tolist() == [2] * 10
            for evaluation in ("linear_probe", "finetune"):
                rows = card["evaluation"][evaluation]
                assert set(rows) == {"distilled", "random", "untrained"}
                for row in rows.values():
                    assert len(row["accuracies"]) == 2 and all(0 <= a <= 1 for a in row["accuracies"])
                assert report["transfer"][evaluation] == rows  # bench shows what the card measured
            assert card["params"]["finetune"]["labels"] == 2
            assert "finetune" in (out / "bench" / "report.md").read_text()


def test_a_krr_st_run_killed_mid_synthesis_resumes_to_the_same_dataset(source, tmp_path, monkeypatch):  # noqa: F811
    args = f"data.source={source} method.ipc=2 {TINY['ssl_dd']} {TINY_EVAL} train.steps=5"
    args += " train.checkpoint_every=2"
    run_cli("run", "mnist-dd-ssl_dd-ipc1", "--out", str(tmp_path / "full"), *args.split())
    loss = ssl_dd.KRRST.loss

    def dies_at_step_3(self, role, batch, step):
        if step == 3:
            raise KeyboardInterrupt
        return loss(self, role, batch, step)

    monkeypatch.setattr(ssl_dd.KRRST, "loss", dies_at_step_3)
    with pytest.raises(AssertionError, match="exited 130"):
        run_cli("run", "mnist-dd-ssl_dd-ipc1", "--out", str(tmp_path / "part"), *args.split())
    monkeypatch.setattr(ssl_dd.KRRST, "loss", loss)
    run_cli("run", "mnist-dd-ssl_dd-ipc1", "--out", str(tmp_path / "part"), "--resume", *args.split())
    a, _, card_a = artifact.read(tmp_path / "full" / "student")
    b, _, card_b = artifact.read(tmp_path / "part" / "student")  # the pool's re-initialisations included
    assert np.array_equal(a, b)
    for evaluation in ("linear_probe", "finetune"):
        assert card_a["evaluation"][evaluation] == card_b["evaluation"][evaluation]
