"""A checkpoint write that dies half-way leaves the previous checkpoint as the latest, loadable one."""

from __future__ import annotations

import pytest
import torch

from stillroom.core import checkpoint
from stillroom.core import recipe as recipes
from stillroom.core.trainer import Trainer
from tests.conftest import lm_recipe


def test_crash_during_checkpoint_write_keeps_previous(tmp_path, tiny_teacher, corpus_dir, monkeypatch):
    rec = recipes.validate(lm_recipe(tiny_teacher, corpus_dir, steps=6, checkpoint_every=2))
    real_save = torch.save
    calls = {"n": 0}

    def dying_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # second checkpoint (step 4): weights written, optimizer state half-way
            real_save(obj, f, *a, **k)
            with open(f, "r+b") as fh:
                fh.truncate(17)
            raise OSError("disk vanished")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="disk vanished"):
        Trainer(rec, tmp_path / "run").fit()
    monkeypatch.setattr(torch, "save", real_save)
    found = checkpoint.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in found] == ["step-0000002"]
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name not in {"step-0000002"}]
    student = Trainer(rec, tmp_path / "run").fit(resume=True)
    assert (student / "model.safetensors").is_file()
