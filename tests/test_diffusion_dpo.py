"""Diffusion-DPO on a distilled student (Wallace et al. 2023): the loss against an independent float64
computation, the pluggable ranking metric, and a tiny run from a distilled student."""

from __future__ import annotations

import json
import math

import pytest
import torch

from stillroom.core import recipe as recipes
from stillroom.core.errors import StillroomError
from stillroom.core.method import Context
from stillroom.core.trainer import Trainer
from stillroom.plugins.diffusion.methods.distill_dpo import (
    PREFERENCES,
    DistillDPO,
    classifier_confidence,
    diffusion_dpo_loss,
    rank_pair,
    register_preference,
)
from stillroom.plugins.diffusion.metrics import load_mnist_split
from stillroom.plugins.diffusion.sampler import load_generator
from tests.test_diffusion_fixtures import diffusion_recipe


def test_dpo_loss_is_the_papers_equation():
    g = torch.Generator().manual_seed(0)
    e = [torch.rand(6, generator=g, dtype=torch.float64) * 0.1 for _ in range(4)]
    beta = 250.0
    got = diffusion_dpo_loss(*e, beta)
    for i in range(6):
        win, win_ref, lose, lose_ref = (float(x[i]) for x in e)
        inside = -beta * (win - win_ref - (lose - lose_ref))
        want = -math.log(1.0 / (1.0 + math.exp(-inside)))
        assert float(got[i]) == pytest.approx(want, rel=1e-12)
    # the policy equal to the reference is indifferent: log 2; fitting the winner better lowers it
    indifferent = diffusion_dpo_loss(e[0], e[0], e[2], e[2], beta)
    assert torch.allclose(indifferent, torch.full((6,), math.log(2.0), dtype=torch.float64))
    assert (diffusion_dpo_loss(e[0] - 0.01, e[0], e[2], e[2], beta) < math.log(2.0)).all()


def test_pairs_are_ranked_by_the_metric():
    pair = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 1, 2, 2)
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.5]])
    winners, losers = rank_pair(pair, scores)
    assert torch.equal(winners, torch.stack([pair[0, 0], pair[1, 1], pair[0, 2]]))
    assert torch.equal(losers, torch.stack([pair[1, 0], pair[0, 1], pair[1, 2]]))


def test_classifier_confidence_prefers_the_requested_digit():
    images, labels = load_mnist_split("eval")
    images, labels = images[:64], labels[:64].long()
    right = classifier_confidence(images, labels)
    wrong = classifier_confidence(images, (labels + 1) % 10)
    assert right.shape == (64,) and (right >= 0).all() and (right <= 1).all()
    assert right.mean() > 0.9 and wrong.mean() < 0.1


def test_unknown_preference_is_one_clear_line(class_teacher):
    data = diffusion_recipe({"name": "distill_dpo", "preference": "aesthetics"}, class_teacher, {})
    with pytest.raises(StillroomError) as err:
        recipes.validate(data)
    msg = str(err.value)
    assert "\n" not in msg and "method.preference" in msg and "unknown preference metric 'aesthetics'" in msg
    assert "classifier_confidence" in msg


def test_dpo_needs_a_distilled_student(tmp_path, class_teacher, label_folder):
    data = diffusion_recipe({"name": "distill_dpo"}, class_teacher, {"source": str(label_folder)})
    with pytest.raises(StillroomError, match="student.init"):
        Trainer(recipes.validate(data), tmp_path / "run").fit()


@pytest.fixture
def brightness():
    """A user metric registered by name: brighter samples win (8x8 tiny teacher, no classifier)."""
    register_preference("brightness", lambda x, c: x.float().mean(dim=(1, 2, 3)).cpu())
    yield "brightness"
    PREFERENCES.pop("brightness")


def test_short_run_tunes_a_distilled_student_with_a_user_metric(
    tmp_path, class_teacher, label_folder, brightness
):
    source = {"source": str(label_folder)}
    progressive = {"name": "progressive", "start_steps": 2, "steps_per_round": 1}
    init = Trainer(
        recipes.validate(diffusion_recipe(progressive, class_teacher, source, steps=1)), tmp_path / "p"
    ).fit()
    method = {"name": "distill_dpo", "preference": brightness, "beta": 50.0, "distill_teacher_steps": 2}
    data = diffusion_recipe(method, class_teacher, source, {"steps": 1, "init": str(init)}, steps=3, lr=1e-2)
    student = Trainer(recipes.validate(data), tmp_path / "dpo").fit()
    rows = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(math.isfinite(r["loss/student"]) for r in rows)
    assert rows[0]["dpo"] == pytest.approx(math.log(2.0), abs=1e-6)  # student == reference at step 0
    assert all(r["reward_margin"] >= 0 and "distill" in r for r in rows)
    before, after = load_generator(init), load_generator(student)
    z, c = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    assert not torch.allclose(before(z, c), after(z, c))
    # e_f with omega = sigma^2 / alpha^2 is the x0 error of the v-predicting student, computed by hand
    rec = recipes.validate(data)
    method = DistillDPO(rec, Context(torch.device("cpu"), torch.float32, tmp_path / "m"))
    method.build()
    x0, eps, t = torch.rand(4, 1, 8, 8) * 2 - 1, torch.randn(4, 1, 8, 8), torch.tensor([999, 999, 999, 999])
    batch = {"cond": {"class_labels": c}, "uncond": {"class_labels": torch.full_like(c, 10)}}
    abar = float(method.abar[999])
    a, s = abar**0.5, (1 - abar) ** 0.5
    with torch.no_grad():
        v = method.student(a * x0 + s * eps, t, class_labels=c).sample
        want = ((x0 - (a * (a * x0 + s * eps) - s * v)) ** 2).mean(dim=(1, 2, 3))
        got = method.error(method.student, x0, eps, t, batch, student=True)
    assert method.student_prediction == "v_prediction" and torch.allclose(got, want, rtol=1e-3, atol=1e-6)
