"""The recipe the diffusion tests train with, and a check that the tiny teachers (tests/conftest.py) load."""

from __future__ import annotations

from pathlib import Path


def diffusion_recipe(method: dict, teacher: Path, data: dict, student: dict | None = None, **train):
    cfg = {
        "steps": 2,
        "batch_size": 4,
        "lr": 1e-3,
        "seed": 0,
        "device": "cpu",
        "tensorboard": False,
        "precision": "fp32",
        "clip_grad": 1.0,
    }
    cfg.update(train)
    return {
        "method": method,
        "teacher": {"path": str(teacher), "guidance": 2.0},
        "student": student or {"steps": 1},
        "data": data,
        "train": cfg,
    }


def test_fixture_teachers_load(class_teacher, text_teacher):
    from stillroom.plugins.diffusion.models import load_teacher

    c = load_teacher(str(class_teacher))
    assert c.conditioning == "class" and c.null_class == 10 and c.image_size == 8
    t = load_teacher(str(text_teacher))
    assert t.conditioning == "text" and t.vae is not None and t.tokenizer("a cat").input_ids[0] == 0
