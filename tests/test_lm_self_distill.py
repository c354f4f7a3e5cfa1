"""``self_distill`` (Lee et al. 2023 with Borup & Andersen's ground-truth weight): its loss against an
independent computation, the two stages as phases (teacher first, then student), chaining a round
from the previous round's student, the one-line guard, the shipped recipe's disjoint domain split, and
``hidden``'s ``mi_alpha`` objective end to end."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from stillroom.core import recipe as recipes
from stillroom.core.errors import StillroomError
from stillroom.core.method import Context
from stillroom.core.trainer import Trainer
from tests.conftest import lm_recipe


def recipe(teacher, corpus, method: dict, **train) -> dict:
    d = lm_recipe(teacher, corpus, **{"checkpoint_every": 0, **train})
    d["method"] = {"name": "self_distill", **method}
    d["student"] = {"path": str(teacher)}  # theta_0, like the teacher before stage 1
    return d


def logged(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("hidden_loss", ["mse", "mi_alpha"])
def test_loss_is_ratio_weighted_hidden_distance_plus_ce(tmp_path, tiny_teacher, corpus_dir, hidden_loss):
    from stillroom.plugins.lm.methods.self_distill import SelfDistill

    method = {"kd_ratio": 0.3, "hidden_weight": 2.0, "hidden_loss": hidden_loss, "mi_alpha": 0.4}
    m = SelfDistill(
        recipes.validate(recipe(tiny_teacher, corpus_dir, method)),
        Context(torch.device("cpu"), torch.float32, tmp_path),
    )
    m.roles = m.build()
    with torch.no_grad():  # a teacher that differs from the student (as after stage 1)
        for param in m.teacher.parameters():
            param.add_(0.05 * torch.randn_like(param))
    batch = m.collate([m.dataset()[i] for i in range(2)])
    got = m.loss("student", batch, 0)

    s_out = m.student(input_ids=batch["input_ids"], output_hidden_states=True)
    with torch.no_grad():
        h_t = m.teacher(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states[-1].double()
    h_s = s_out.hidden_states[-1].detach().double()
    labels = batch["input_ids"][:, 1:]
    ce = torch.nn.functional.cross_entropy(
        s_out.logits[:, :-1].reshape(-1, s_out.logits.shape[-1]), labels.reshape(-1)
    )
    if hidden_loss == "mse":
        hidden = ((h_s - h_t) ** 2).mean()
    else:  # -I_alpha of the Gaussian critic, written from the formula with the loop reference
        from tests.test_lm_losses import ref_mi_alpha

        s, t = h_s.reshape(-1, h_s.shape[-1]), h_t.reshape(-1, h_t.shape[-1])
        v = t.var(dim=0, unbiased=False).mean()
        S = -torch.cdist(t, s).pow(2) / (t.shape[-1] * 0.1 * v)
        hidden = torch.tensor(-ref_mi_alpha(S, 0.4))
    expected = 0.3 * 2.0 * hidden + 0.7 * ce.double()
    assert got.loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert got.metrics["hidden"] == pytest.approx(hidden.item(), rel=1e-4)


def test_stage_one_trains_only_the_teacher_then_only_the_student_and_resumes(
    tmp_path, tiny_teacher, corpus_dir
):
    d = recipe(tiny_teacher, corpus_dir, {"further_steps": 3}, steps=6, checkpoint_every=3, lr=0.01)
    student_dir = Trainer(recipes.validate(d), tmp_path / "run").fit()
    rows = logged(tmp_path / "run")
    assert [("teacher_ce" in r, "hidden" in r) for r in rows if "final" not in r] == [(True, False)] * 3 + [
        (False, True)
    ] * 3
    initial = load_file(tiny_teacher / "model.safetensors")
    ckpt3 = tmp_path / "run" / "checkpoints" / "step-0000003"
    ckpt6 = tmp_path / "run" / "checkpoints" / "step-0000006"

    def weights(ckpt, role):
        return load_file(next(ckpt.glob(f"{role}*.safetensors")))

    t3, t6 = weights(ckpt3, "teacher"), weights(ckpt6, "teacher")
    s3, s6 = weights(ckpt3, "student"), weights(ckpt6, "student")
    key = next(k for k in t3 if "layers.0.mlp" in k)
    assert not torch.equal(t3[key], initial[key])  # stage 1 moved the teacher
    assert all(torch.equal(t3[k], t6[k]) for k in t3)  # ... and stage 2 left it alone
    assert all(torch.equal(s3[k], initial[k]) for k in initial if k in s3)  # the student waited for stage 2
    assert any(not torch.equal(s3[k], s6[k]) for k in s3)
    # a run stopped after stage 1 resumes into stage 2 and ends bitwise where the whole run did
    Trainer(recipes.validate(d), tmp_path / "part").fit()
    for path in [tmp_path / "part" / "checkpoints" / "step-0000006", tmp_path / "part" / "student"]:
        shutil.rmtree(path)
    resumed = Trainer(recipes.validate(d), tmp_path / "part").fit(resume=True)
    a, b = load_file(student_dir / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_next_round_takes_the_previous_student_as_its_frozen_teacher(tmp_path, tiny_teacher, corpus_dir):
    from stillroom.plugins.lm.methods.self_distill import SelfDistill

    first = Trainer(
        recipes.validate(recipe(tiny_teacher, corpus_dir, {"further_steps": 2}, steps=4)), tmp_path / "r1"
    ).fit()
    d = recipe(tiny_teacher, corpus_dir, {"kd_ratio": 0.7})
    d["teacher"]["path"] = str(first)
    m = SelfDistill(recipes.validate(d), Context(torch.device("cpu"), torch.float32, tmp_path / "r2"))
    roles = m.build()
    assert not roles["teacher"].trainable and m.phases(0)[0].role == "student"
    saved = load_file(first / "model.safetensors")
    assert all(torch.equal(p, saved[k]) for k, p in m.teacher.state_dict().items() if k in saved)
    initial = load_file(tiny_teacher / "model.safetensors")
    assert all(torch.equal(p, initial[k]) for k, p in m.student.state_dict().items() if k in initial)


def test_further_steps_must_leave_steps_for_the_student(tmp_path, tiny_teacher, corpus_dir):
    d = recipe(tiny_teacher, corpus_dir, {"further_steps": 6}, steps=6)
    with pytest.raises(StillroomError, match="further_steps=6 leaves none of train.steps=6"):
        Trainer(recipes.validate(d), tmp_path / "run").fit()


def test_shipped_recipe_trains_on_the_head_of_the_unseen_plays_and_evaluates_on_the_tail(tmp_path):
    from stillroom.plugins.lm import data as textdata
    from stillroom.plugins.lm.methods.self_distill import SelfDistill

    rec = recipes.load("lm-self-distill")
    assert rec.method_name == "self_distill" and rec.method.further_steps < rec.train.steps
    m = SelfDistill(rec, Context(torch.device("cpu"), torch.float32, tmp_path))
    from stillroom.plugins.lm import models

    _, m.tokenizer = models.load_causal_lm(rec.teacher.path)
    stream = textdata.token_stream(
        m.tokenizer, textdata.read_records(textdata.split_files(rec.data.source, "train"))
    )
    train = torch.cat([m.examples()[i]["input_ids"] for i in range(len(m.examples()))])
    heldout = m.heldout().reshape(-1)
    assert torch.equal(train, stream[: train.numel()]) and torch.equal(heldout, stream[-heldout.numel() :])
    assert (
        train.numel() + heldout.numel() <= stream.numel()
    )  # disjoint: the held-out tail is never trained on


def test_hidden_mi_alpha_objective_runs_and_lowers_its_loss(tmp_path, tiny_teacher, corpus_dir):
    d = lm_recipe(tiny_teacher, corpus_dir, checkpoint_every=0, steps=16, lr=0.01)
    d["method"] = {"name": "hidden", "hidden_loss": "mi_alpha", "mi_alpha": 0.5, "kd_ratio": 0.0}
    Trainer(recipes.validate(d), tmp_path / "run").fit()
    hidden = [r["hidden"] for r in logged(tmp_path / "run") if "hidden" in r]
    assert len(hidden) == 16 and sum(hidden[-4:]) < sum(hidden[:4])
