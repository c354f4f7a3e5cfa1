"""``lm_had``: the loss terms against a hand computation on tiny tensors, the GPT-2 student of a Llama
teacher trained and saved through the trainer, the shipped recipe, and the refused block copy."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from stillroom.core import recipe as recipes
from stillroom.core.errors import StillroomError
from stillroom.core.host import Host
from stillroom.core.trainer import Trainer
from stillroom.plugins.lm.methods.had import HADParams, had_terms
from tests.conftest import lm_recipe


def _nll(row: list[float], target: int) -> float:
    return math.log(sum(math.exp(v) for v in row)) - row[target]


def test_terms_match_a_hand_computation():
    torch.manual_seed(0)
    clean = torch.tensor([[1, 2, 3, 4, 0]])
    noisy = torch.tensor([[1, 4, 3, 2, 0]])  # positions 1 and 3 masked
    labels = torch.tensor([[1, 2, 3, 4, -100]])  # position 4 is padding
    batch = {"input_ids": clean, "labels": labels, "attention_mask": (labels != -100).long()}
    logits = torch.randn(1, 5, 6)
    s_feat, t_feat = torch.randn(1, 5, 3), torch.randn(1, 5, 2)
    proj = torch.nn.Linear(3, 2, bias=False)
    got = had_terms(logits, [s_feat], [t_feat], [proj], batch, noisy, HADParams(hidden_loss="mse"))

    lg, w = logits[0].tolist(), proj.weight.detach()
    # CE: positions whose input is visible and whose next label is counted: 0 -> 2, 2 -> 4
    ce = (_nll(lg[0], 2) + _nll(lg[2], 4)) / 2
    # reconstruction: at masked positions 1 and 3 the head predicts the clean token there (2 and 4)
    rec = (_nll(lg[1], 2) + _nll(lg[3], 4)) / 2
    # alignment: mse of the projected student feature and the teacher's at visible positions 0 and 2
    align = 0.0
    for i in (0, 2):
        diff = w @ s_feat[0, i] - t_feat[0, i]
        align += float((diff**2).mean()) / 2
    assert got["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert got["rec"].item() == pytest.approx(rec, rel=1e-5)
    assert got["align"].item() == pytest.approx(align, rel=1e-5)


def test_without_masked_tokens_reconstruction_is_zero_and_ce_is_plain_next_token():
    ids = torch.tensor([[3, 1, 2, 0]])
    labels = torch.tensor([[3, 1, 2, 0]])
    batch = {"input_ids": ids, "labels": labels}
    logits = torch.randn(1, 4, 5)
    feat = torch.randn(1, 4, 2)
    got = had_terms(logits, [feat], [feat], [torch.nn.Identity()], batch, ids.clone(), HADParams())
    plain = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:])
    assert got["rec"].item() == 0 and got["align"].item() == pytest.approx(0, abs=1e-7)
    assert got["ce"].item() == pytest.approx(plain.item(), rel=1e-6)


def _recipe(teacher, corpus, **student):
    d = lm_recipe(teacher, corpus, steps=2, checkpoint_every=0)
    d["method"] = {"name": "lm_had", "mask_ratio": 0.3}
    d["student"] = {"config": {"n_layer": 1, "n_embd": 16, "n_head": 2}, "init": "random", **student}
    return d


def test_two_steps_save_a_loadable_gpt2_student_of_the_llama_teacher(tmp_path, tiny_teacher, corpus_dir):
    from transformers import AutoModelForCausalLM

    assert Host().method("lm_had").name == "lm_had"
    student_dir = Trainer(recipes.validate(_recipe(tiny_teacher, corpus_dir)), tmp_path / "run").fit()
    rows = [yaml.safe_load(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "rec" in r]
    assert len(steps) == 2 and all(r["rec"] > 0 and r["align"] > 0 and r["ce"] > 0 for r in steps)
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    assert (student.config.model_type, teacher.config.model_type) == ("gpt2", "llama")
    assert student.config.n_embd == 16 and student.config.vocab_size == teacher.config.vocab_size
    assert not any(k.startswith("projections") for k in student.state_dict())
    ids = torch.tensor([[1, 2, 3]])
    assert student(ids).logits.shape == (1, 3, teacher.config.vocab_size)


def test_block_copy_init_is_refused_in_one_line(tmp_path, tiny_teacher, corpus_dir):
    d = _recipe(tiny_teacher, corpus_dir, init="teacher-layers")
    with pytest.raises(StillroomError, match="student.init=random"):
        Trainer(recipes.validate(d), tmp_path / "run").fit()


def test_shipped_recipe_validates():
    rec = recipes.validate(yaml.safe_load(recipes.named_recipes()["lm-had"].read_text()))
    assert rec.method_name == "lm_had" and rec.student.init == "random"
