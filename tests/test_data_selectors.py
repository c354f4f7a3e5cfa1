"""Data selection (``data.select``): the hook and its listing, the recipe's one-line errors, each
selector's rule against an independent computation (a hand-written loop, the max-min problem solved as
a linear programme, EL2N by hand), weights as repetitions, and tiny ``classifier_kd`` runs through the
trainer with each selector: what the run trained on, how often the teacher ran, a bitwise resume."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import stillroom
from stillroom.core import recipe as recipes
from stillroom.core.errors import StillroomError
from stillroom.core.host import Host
from stillroom.core.selection import Pool, Selectable, Selection, repetitions
from stillroom.plugins.classifier.base import ClassifierMethod
from stillroom.plugins.classifier.models import ClassifierConfig, ConvClassifier, save_classifier
from stillroom.plugins.classifier.selection import mix_statistics
from stillroom.plugins.selectors.active import ActiveParams, RobustActive, margin_gain, robust_distribution
from stillroom.plugins.selectors.kd3 import KD3, KD3Params
from stillroom.plugins.selectors.prune_kd import PruneKD, PruneKDParams


class FakeMethod(Selectable):
    """A pool of given teacher / student probabilities and labels."""

    def __init__(self, teacher, student=None, labels=None):
        self.probs = {"teacher": np.asarray(teacher, float), "student": student}
        self.labels = labels

    def pool_size(self):
        return len(self.probs["teacher"])

    def predict(self, role, index):
        return self.probs[role][index]

    def pool_labels(self, index):
        return None if self.labels is None else np.asarray(self.labels)[index]


# -- the hook, the listing, the recipe ---------------------------------------------------------------
def test_the_hook_registers_the_builtin_selectors_and_plugins_lists_them():
    infos = {i.name: i for i in Host().infos()}
    assert infos["selectors"].builtin and infos["selectors"].error is None
    assert infos["selectors"].hooks == ["register_data_selectors"]
    assert sorted(infos["selectors"].data_selectors) == ["active", "kd3", "prune_kd"]
    assert infos["selectors"].as_json()["data_selectors"] == infos["selectors"].data_selectors
    assert Host().lookup("data_selectors", "kd3") is KD3


def test_recipe_errors_are_one_line():
    cases = {
        ("mnist-classifier-kd", "data.select.name=nope"): "recipe key 'data.select.name': unknown data "
        "selector 'nope' (available: active, kd3, prune_kd;",
        (
            "mnist-classifier-kd",
            "data.select.tau=2",
        ): "recipe key 'data.select' must be a section with a 'name'",
        ("lm-kd", "data.select.name=kd3"): "recipe key 'data.select': method 'kd' (family 'lm') does not "
        "support data selection",
        ("mnist-classifier-kd", "data.select.name=active"): "recipe key 'data.select.budget': Field required",
    }
    for (recipe, override), message in cases.items():
        with pytest.raises(StillroomError) as err:
            recipes.load(recipe, [override])
        assert message in str(err.value) and "\n" not in str(err.value)


def test_recipe_round_trips_and_prune_kd_sets_the_kd_weight():
    rec = recipes.load("mnist-classifier-kd", ["data.select.name=prune_kd", "data.select.keep=0.25"])
    assert rec.method.alpha == pytest.approx(1 - 0.5 * 0.25)  # alpha(f) = 1 - (1 - alpha_full) f
    assert rec.to_dict()["data"]["select"]["keep"] == 0.25
    again = recipes.validate(rec.to_dict())  # the saved recipe validates to the same (resume compares)
    assert again.to_dict() == rec.to_dict()
    fixed = recipes.load("mnist-classifier-kd", ["data.select.name=prune_kd", "data.select.adaptive=false"])
    assert fixed.method.alpha == 0.9


# -- the rules against independent computations ----------------------------------------------------------
def test_kd3_keeps_confident_agreeing_examples_by_hand():
    rng = np.random.default_rng(0)
    t, s = rng.dirichlet([0.3] * 4, size=60), rng.dirichlet([0.3] * 4, size=60)
    params = KD3Params(tau=0.6, beta=0.3, budget=10)
    chosen = KD3(params).select(Pool(FakeMethod(t, s)), step=5, steps=10, previous=None)
    want = []
    for i in range(60):
        p = [0.7 * t[i][c] + 0.3 * s[i][c] for c in range(4)]
        if max(range(4), key=lambda c: t[i][c]) == max(range(4), key=lambda c: s[i][c]) and max(p) >= 0.6:
            want.append((max(p), i))
    want = sorted(want, key=lambda x: -x[0])[:10]
    assert chosen.indices.tolist() == [i for _, i in want]
    assert chosen.weights.tolist() == pytest.approx([c for c, _ in want])
    # step 0: the teacher alone (no agreement test), no budget: every example at tau
    first = KD3(KD3Params(tau=0.6, weighted=False)).select(Pool(FakeMethod(t, s)), 0, 10, None)
    assert sorted(first.indices.tolist()) == [i for i in range(60) if t[i].max() >= 0.6]
    assert first.weights is None
    with pytest.raises(StillroomError, match="kd3: no example of the pool reaches confidence 1.0"):
        KD3(KD3Params(tau=1.0)).select(Pool(FakeMethod(t, s)), 0, 10, None)


def test_robust_distribution_solves_the_max_min_problem_as_a_linear_programme():
    """max_p sum v - (sum of the k largest v), v = p g, sum p = Q, 0 <= p <= 1, solved by scipy's LP:
    the top-k sum is min_{u >= 0, z >= 0} k u + sum z with z_i >= v_i - u."""
    linprog = pytest.importorskip("scipy.optimize").linprog
    rng = np.random.default_rng(1)
    for k in (0.0, 2.0, 5.0):
        g = rng.uniform(0.05, 1.0, size=30)
        q = 3
        n = len(g)
        # variables [p (n), z (n), u]; minimise -(g.p - k u - sum z)
        c = np.concatenate([-g, np.ones(n), [k]])
        a_ub = np.hstack([np.diag(g), -np.eye(n), -np.ones((n, 1))])  # g_i p_i - z_i - u <= 0
        a_eq = np.concatenate([np.ones(n), np.zeros(n), [0]])[None]
        bounds = [(0, 1)] * n + [(0, None)] * (n + 1)
        lp = linprog(c, A_ub=a_ub, b_ub=np.zeros(n), A_eq=a_eq, b_eq=[q], bounds=bounds)
        p = robust_distribution(g, q, k)
        v = p * g
        value = v.sum() - np.sort(v)[::-1][: int(k)].sum()
        assert p.sum() == pytest.approx(q) and p.max() <= 1
        assert value == pytest.approx(-lp.fun, rel=1e-6)
    # k = 0: plain margin sampling, the Q largest gains
    assert robust_distribution(g, 3, 0.0)[np.argsort(-g)[:3]] == pytest.approx(1)


def test_active_spends_its_budget_over_rounds_on_unqueried_examples():
    rng = np.random.default_rng(2)
    student = rng.dirichlet([0.5] * 3, size=40)
    assert margin_gain(np.array([[0.7, 0.2, 0.1]])) == pytest.approx([0.5])
    pool = Pool(FakeMethod(rng.dirichlet([1] * 3, size=40), student))
    selector = RobustActive(ActiveParams(budget=12, every=10, mistake_rate=0.0), seed=0)
    first = selector.select(pool, 0, 30, None)
    assert len(first.indices) == 4 and pool.teacher_queries == 0  # uniform; the student only afterwards
    second = selector.select(pool, 10, 30, first)
    new = np.setdiff1d(second.indices, first.indices)
    assert len(second.indices) == 8 and set(first.indices) <= set(second.indices)
    left = np.setdiff1d(np.arange(40), first.indices)  # mistake_rate 0: the 4 largest gains left
    assert sorted(new.tolist()) == sorted(left[np.argsort(-margin_gain(student[left]))[:4]].tolist())
    assert len(selector.select(pool, 20, 30, second).indices) == 12 and pool.teacher_queries == 0


def test_prune_kd_el2n_by_hand_and_random_keeps_the_fraction():
    t = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.5, 0.5]])
    labels = [0, 0, 0, 1]
    el2n = [np.hypot(t[i][0] - (labels[i] == 0), t[i][1] - (labels[i] == 1)) for i in range(4)]
    hard = PruneKD(PruneKDParams(keep=0.5, score="el2n")).select(
        Pool(FakeMethod(t, labels=labels)), 0, 1, None
    )
    assert hard.indices.tolist() == sorted(np.argsort(el2n)[::-1][:2].tolist()) == [2, 3]
    easy = PruneKDParams(keep=0.5, score="el2n", prefer="easy")
    assert PruneKD(easy).select(Pool(FakeMethod(t, labels=labels)), 0, 1, None).indices.tolist() == [0, 1]
    rand = PruneKD(PruneKDParams(keep=0.3)).select(Pool(FakeMethod(np.ones((50, 2)) / 2)), 0, 1, None)
    assert len(rand.indices) == 15 and len(set(rand.indices.tolist())) == 15
    with pytest.raises(StillroomError, match="prune_kd: score el2n needs labels"):
        PruneKD(PruneKDParams(score="el2n")).select(Pool(FakeMethod(t)), 0, 1, None)


def test_kd3_mixes_towards_confident_examples_and_mix_statistics_by_hand():
    rng = np.random.default_rng(3)
    t = rng.dirichlet([0.3] * 4, size=80)
    chosen = KD3(KD3Params(tau=0.5, mix=0.5)).select(Pool(FakeMethod(t)), 0, 10, None)
    first, second, lam = chosen.mixes
    assert len(first) == round(len(chosen.indices) / 2) and set(first) <= set(chosen.indices.tolist())
    assert set(second) <= set(chosen.indices[: len(chosen.indices) // 4].tolist())  # the most confident
    assert ((lam >= 0) & (lam <= 1)).all()
    assert len(chosen.example_weights()) == len(chosen.indices) + len(first)

    x, y = torch.randn(3, 2, 5, 5, dtype=torch.float64), torch.randn(3, 2, 5, 5, dtype=torch.float64) * 3 + 1
    lam = torch.tensor([0.0, 0.3, 1.0])
    got = mix_statistics(x, y, lam, eps=0.0).numpy()
    for n in range(3):
        for c in range(2):
            a, b, w = x[n, c].numpy(), y[n, c].numpy(), float(lam[n])
            mu, sd = w * a.mean() + (1 - w) * b.mean(), w * a.std(ddof=1) + (1 - w) * b.std(ddof=1)
            np.testing.assert_allclose(got[n, c], sd * (a - a.mean()) / a.std(ddof=1) + mu, atol=1e-12)
    # lam = 0 takes y's statistics, lam = 1 leaves x as it is
    assert float(torch.from_numpy(got[0]).mean()) == pytest.approx(float(y[0].mean()), abs=1e-9)
    np.testing.assert_allclose(got[2], x[2].numpy(), atol=1e-12)


def test_weights_become_repetitions_in_proportion():
    counts = repetitions(np.array([3.0, 1.0, 0.0, 4.0]))
    assert counts.tolist() == [2, 0, 0, 2]  # 4 * (3, 1, 0, 4) / 8 = (1.5, .5, 0, 2): remainders to the first
    counts = repetitions(np.array([1.0, 1.0, 2.0]))
    assert counts.tolist() == [1, 1, 1]  # 3 * (.25, .25, .5) = (.75, .75, 1.5)
    assert repetitions(np.arange(1.0, 101.0)).sum() == 100
    with pytest.raises(ValueError):
        Selection(np.array([1, 1]))


# -- end to end through the trainer ---------------------------------------------------------------------
TINY = [
    "train.steps=12",
    "train.batch_size=16",
    "train.warmup_steps=0",
    "train.eval_every=0",
    "train.tensorboard=false",
    "train.device=cpu",
    "student.channels=[4, 8]",
    "student.feature_dim=16",
]
SELECTORS = {
    "kd3": [
        "data.select.name=kd3",
        "data.select.every=4",
        "data.select.tau=0.1",
        "data.select.budget=60",
        "data.select.mix=0.5",
    ],
    "active": ["data.select.name=active", "data.select.budget=40", "data.select.every=4"],
    "prune_kd": ["data.select.name=prune_kd", "data.select.keep=0.2", "data.select.score=el2n"],
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A small random teacher and a 200 / 50 image slice of the embedded MNIST."""
    from stillroom.plugins.classifier import data

    root = tmp_path_factory.mktemp("select")
    torch.manual_seed(0)
    save_classifier(ConvClassifier(ClassifierConfig(channels=[8, 8], feature_dim=24)), root / "teacher")
    train, eval_ = data.load_split("embedded:mnist", "train"), data.load_split("embedded:mnist", "eval")
    np.savez(
        root / "pool.npz",
        train_images=train[0][:200, 0],
        train_labels=train[1][:200],
        eval_images=eval_[0][:50, 0],
        eval_labels=eval_[1][:50],
    )
    return root, [f"teacher.path={root / 'teacher'}", f"data.source={root / 'pool.npz'}", *TINY]


@pytest.fixture()
def teacher_rows(monkeypatch):
    """Training-pool images the teacher was run on (held-out evaluation not counted)."""
    rows = []
    original = ClassifierMethod.teacher_outputs

    def counting(self, images):
        if images is not getattr(self, "heldout", None):
            rows.append(len(images))
        return original(self, images)

    monkeypatch.setattr(ClassifierMethod, "teacher_outputs", counting)
    return rows


@pytest.mark.parametrize("name", sorted(SELECTORS))
def test_classifier_kd_runs_with_each_selector(name, setup, tmp_path, teacher_rows):
    root, overrides = setup
    student = stillroom.train("mnist-classifier-kd", tmp_path / "run", [*overrides, *SELECTORS[name]])
    selection = json.loads((tmp_path / "run" / "selection.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert selection["selector"] == name and selection["pool"] == 200
    assert (student / "model.safetensors").is_file() and 0 <= rows[-1]["eval/accuracy"] <= 1
    card = json.loads((student / "stillroom.json").read_text())
    assert card["recipe"]["data"]["select"]["name"] == name
    if name == "active":  # 3 rounds of a 40-query budget; the teacher ran on those images only
        assert [r["select/examples"] for r in rows if "select/examples" in r] == [13, 27, 40]
        assert selection["teacher_queries"] == 40 and sum(teacher_rows) == 40
    if name == "prune_kd":  # EL2N reads the teacher on the whole pool once, the kept 40 come from it
        assert len(selection["indices"]) == 40 and sum(teacher_rows) == 200
        assert card["recipe"]["method"]["alpha"] == pytest.approx(0.9)
    if name == "kd3":  # selected at steps 0, 4, 8; the teacher ran once per pool image and mixed image
        assert [r["step"] for r in rows if "select/examples" in r] == [1, 5, 9]
        kept = [r["select/examples"] for r in rows if "select/examples" in r]
        mixed = [r["select/mixed"] for r in rows if "select/mixed" in r]
        assert kept[0] == 60 and all(k <= 60 for k in kept) and mixed == [round(k / 2) for k in kept]
        assert sum(teacher_rows) == 200 + sum(mixed) and len(selection["mixes"][0]) == mixed[-1]


def test_resume_with_a_dynamic_selection_is_bitwise_identical(setup, tmp_path):
    root, overrides = setup
    args = [*overrides, *SELECTORS["kd3"], "train.checkpoint_every=6"]
    full = stillroom.train("mnist-classifier-kd", tmp_path / "full", args)
    stillroom.train("mnist-classifier-kd", tmp_path / "part", args)
    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step-0000012")
    shutil.rmtree(tmp_path / "part" / "student")
    resumed = stillroom.train("mnist-classifier-kd", tmp_path / "part", args, resume=True)
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
