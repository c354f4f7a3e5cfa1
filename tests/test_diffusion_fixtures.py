"""Tiny diffusers teachers built from configs (class- and text-conditional) for the diffusion tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from stillroom.testing import build_class_teacher, build_label_folder, build_text_teacher


@pytest.fixture(scope="session")
def label_folder(tmp_path_factory) -> Path:
    return build_label_folder(tmp_path_factory.mktemp("labels"))


@pytest.fixture(scope="session")
def class_teacher(tmp_path_factory) -> Path:
    return build_class_teacher(tmp_path_factory.mktemp("class_teacher"))


@pytest.fixture(scope="session")
def text_teacher(tmp_path_factory) -> Path:
    return build_text_teacher(tmp_path_factory.mktemp("text_teacher"))


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


def test_fixture_teachers_load(class_teacher, text_teacher):  # noqa: F811
    from stillroom.plugins.diffusion.models import load_teacher

    c = load_teacher(str(class_teacher))
    assert c.conditioning == "class" and c.null_class == 10 and c.image_size == 8
    t = load_teacher(str(text_teacher))
    assert t.conditioning == "text" and t.vae is not None and t.tokenizer("a cat").input_ids[0] == 0
