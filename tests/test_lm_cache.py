"""The offline top-k teacher cache: round-trips the teacher's top-k, is memory-mapped, trains without
the teacher in memory, is reused on resume and rebuilt when what it was built from changes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from stillroom.core import recipe as recipes
from stillroom.core.errors import StillroomError
from stillroom.core.method import Context
from stillroom.core.trainer import Trainer
from tests.conftest import lm_recipe


def cached(teacher, corpus, k=6, method=None, **train):
    d = lm_recipe(teacher, corpus, **{"checkpoint_every": 0, **train})
    d["teacher"].update({"cache": "topk", "k": k})
    d["student"]["init"] = "random"  # far from the (random) teacher, so the KD term has work to do
    d["method"]["kd_ratio"] = 1.0
    if method is not None:
        d["method"] = method
    return d


def test_cache_round_trips_the_teachers_top_k(tmp_path, tiny_teacher, corpus_dir):
    from transformers import AutoModelForCausalLM

    from stillroom.plugins.lm.methods.kd import KD

    m = KD(
        recipes.validate(cached(tiny_teacher, corpus_dir)),
        Context(torch.device("cpu"), torch.float32, tmp_path),
    )
    roles = m.build()
    assert set(roles) == {"student"} and m.teacher is None  # the teacher is gone once the cache exists
    assert isinstance(m.cache.indices, np.memmap) and isinstance(m.cache.logprobs, np.memmap)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    items = [m.dataset()[i] for i in (0, 5, 3)]
    batch = m.collate(items)
    with torch.no_grad():
        log_p = torch.log_softmax(teacher(input_ids=batch["input_ids"]).logits / 2.0, -1)  # recipe T = 2
    values, idx = log_p.topk(6, -1)
    assert torch.equal(batch["topk_indices"], idx)
    assert torch.allclose(batch["topk_logprobs"], values, atol=2e-3)  # float16 storage
    tail = torch.log1p(-values.exp().sum(-1))
    assert torch.allclose(batch["topk_tail"], tail, atol=1e-4)
    meta = json.loads((tmp_path / "teacher_cache" / "meta.json").read_text())
    assert meta["k"] == 6 and meta["temperature"] == 2.0 and meta["vocab_size"] == teacher.config.vocab_size
    heldout_top1 = teacher(input_ids=m.heldout()).logits.argmax(-1)
    assert torch.equal(m.cache.eval_top1, heldout_top1)


def test_cached_kd_trains_evaluates_and_matches_live_kd_with_the_full_vocabulary(
    tmp_path, tiny_teacher, corpus_dir
):
    from stillroom.plugins.lm.methods.kd import KD

    vocab = json.loads((tiny_teacher / "config.json").read_text())["vocab_size"]
    out = Trainer(
        recipes.validate(cached(tiny_teacher, corpus_dir, k=8, steps=20, lr=0.01)), tmp_path / "run"
    ).fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kd = [r["kd"] for r in rows if "kd" in r]
    assert sum(kd[-5:]) < 0.9 * sum(kd[:5])
    final = json.loads((tmp_path / "run" / "run.json").read_text())["final_eval"]
    assert 0 <= final["top1_agreement"] <= 1 and (out / "model.safetensors").is_file()
    # with k = V the bins are the whole vocabulary: the cached loss equals the live one
    full = KD(
        recipes.validate(cached(tiny_teacher, corpus_dir, k=vocab)),
        Context(torch.device("cpu"), torch.float32, tmp_path / "full"),
    )
    live_recipe = cached(tiny_teacher, corpus_dir)
    live_recipe["teacher"]["cache"] = "none"
    live = KD(recipes.validate(live_recipe), Context(torch.device("cpu"), torch.float32, tmp_path / "live"))
    torch.manual_seed(0)
    full.build()
    torch.manual_seed(0)
    live.build()
    items = [full.dataset()[i] for i in range(4)]
    a = full.loss("student", full.collate(items), 0).metrics["kd"]
    b = live.loss("student", live.collate(items), 0).metrics["kd"]
    assert a == pytest.approx(b, rel=1e-3)


@pytest.mark.parametrize("method", [{"name": "taid", "t_start": 0.8}, {"name": "sinkhorn", "positions": 32}])
def test_other_logit_methods_train_from_the_cache(tmp_path, tiny_teacher, corpus_dir, method):
    d = cached(tiny_teacher, corpus_dir, k=8, method=method, steps=16, lr=0.01)
    Trainer(recipes.validate(d), tmp_path / "run").fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss/student"] for r in rows if "loss/student" in r]
    assert sum(losses[-4:]) < sum(losses[:4])


def test_resume_reuses_the_cache_and_is_bitwise_identical(tmp_path, tiny_teacher, corpus_dir):
    d = cached(tiny_teacher, corpus_dir, steps=6, checkpoint_every=3)
    full = Trainer(recipes.validate(d), tmp_path / "full").fit()
    Trainer(recipes.validate(d), tmp_path / "part").fit()
    files = tmp_path / "part" / "teacher_cache" / "logprobs.npy"
    stamp = files.stat().st_mtime_ns
    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step-0000006")
    shutil.rmtree(tmp_path / "part" / "student")
    resumed = Trainer(recipes.validate(d), tmp_path / "part").fit(resume=True)
    assert files.stat().st_mtime_ns == stamp  # reused, not rebuilt
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cache_is_rebuilt_when_k_changes(tmp_path, tiny_teacher, corpus_dir):
    from stillroom.plugins.lm.methods.kd import KD

    for k in (4, 5):
        m = KD(
            recipes.validate(cached(tiny_teacher, corpus_dir, k=k)),
            Context(torch.device("cpu"), torch.float32, tmp_path),
        )
        m.build()
        assert m.cache.indices.shape[-1] == k


@pytest.mark.parametrize("name", ["gkd", "seqkd", "hidden"])
def test_methods_that_need_the_live_teacher_refuse_the_cache(tmp_path, tiny_teacher, corpus_dir, name):
    d = cached(tiny_teacher, corpus_dir, method={"name": name})
    with pytest.raises(StillroomError, match="needs the teacher in memory"):
        Trainer(recipes.validate(d), tmp_path / "run").fit()
