"""The trainer end to end on a tiny KD run: loss falls, checkpoints, resume, student loads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from stillroom.core import recipe as recipes
from stillroom.core.errors import StillroomError
from stillroom.core.trainer import Trainer, lr_lambda
from tests.conftest import lm_recipe


def train(tmp_path, teacher, corpus, name="run", resume=False, **cfg):
    rec = recipes.validate(
        recipes.apply_overrides(lm_recipe(teacher, corpus), [f"train.{k}={v}" for k, v in cfg.items()])
    )
    return Trainer(rec, tmp_path / name).fit(resume=resume)


def test_kd_run_lowers_loss_and_saves_a_plain_transformers_student(tmp_path, tiny_teacher, corpus_dir):
    student_dir = train(tmp_path, tiny_teacher, corpus_dir, steps=30, checkpoint_every=10, lr=0.01)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss/student"] for r in rows if "loss/student" in r]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.92 * sum(losses[:5]) / 5  # random teacher: the KL floor is high
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(student_dir)
    assert model.config.num_hidden_layers == 1
    tok = AutoTokenizer.from_pretrained(student_dir)
    out = model.generate(**tok("To be", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[1] > 2
    card = json.loads((student_dir / "stillroom.json").read_text())
    assert card["method"] == "kd" and card["recipe"]["train"]["steps"] == 30
    final = json.loads((tmp_path / "run" / "run.json").read_text())["final_eval"]
    assert final["perplexity"] > 1 and 0 <= final["top1_agreement"] <= 1
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["step-0000010", "step-0000020", "step-0000030"]


def test_resume_in_process_is_bitwise_identical(tmp_path, tiny_teacher, corpus_dir):
    full = train(tmp_path, tiny_teacher, corpus_dir, name="full", steps=6, ema=0.9)
    part = train(tmp_path, tiny_teacher, corpus_dir, name="part", steps=6, ema=0.9)
    # throw away the end of the second run, then resume it from step 4
    import shutil

    for extra in ("step-0000006",):
        shutil.rmtree(tmp_path / "part" / "checkpoints" / extra)
    shutil.rmtree(part)
    resumed = train(tmp_path, tiny_teacher, corpus_dir, name="part", resume=True, steps=6, ema=0.9)
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == sorted(steps) and steps.count(5) == 1


def test_refuses_to_overwrite_a_run_and_to_resume_nothing(tmp_path, tiny_teacher, corpus_dir):
    with pytest.raises(StillroomError, match="nothing to resume"):
        train(tmp_path, tiny_teacher, corpus_dir, name="empty", resume=True, steps=2)
    train(tmp_path, tiny_teacher, corpus_dir, name="done", steps=2)
    with pytest.raises(StillroomError, match="already holds a run"):
        train(tmp_path, tiny_teacher, corpus_dir, name="done", steps=2)
    with pytest.raises(StillroomError, match="different recipe"):
        train(tmp_path, tiny_teacher, corpus_dir, name="done", resume=True, steps=3)


def test_lr_schedule_warmup_then_cosine_to_floor():
    cfg = recipes.TrainConfig(steps=110, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
