"""Shared fixtures: tiny models built from configs (no hub downloads), run from the repo root."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from stillroom.testing import build_class_teacher, build_label_folder, build_text_teacher

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
STILLROOM = str(VENV_BIN / "stillroom")

CORPUS = (
    "To be, or not to be, that is the question:\n"
    "Whether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\n"
    "Or to take arms against a sea of troubles\n"
    "And by opposing end them. To die - to sleep,\n"
    "No more; and by a sleep to say we end\n"
    "The heart-ache and the thousand natural shocks\n"
    "That flesh is heir to: 'tis a consummation\n"
    "Devoutly to be wish'd. To die, to sleep;\n"
)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    (d / "train.txt").write_text(CORPUS * 20)
    (d / "valid.txt").write_text(CORPUS * 2)
    return d


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, corpus_dir) -> Path:
    from stillroom.testing import build_tiny_llama, build_tokenizer

    d = tmp_path_factory.mktemp("teacher")
    tok = build_tokenizer(d, vocab_size=320, text=(corpus_dir / "train.txt").read_text())
    build_tiny_llama(d, tok, layers=2, hidden=32)
    return d


def lm_recipe(teacher: Path, corpus: Path, **train) -> dict:
    """A tiny but complete KD recipe as a dict (tests write it as YAML)."""
    base_train = {
        "steps": 6,
        "batch_size": 4,
        "lr": 1e-3,
        "seed": 0,
        "checkpoint_every": 2,
        "keep_checkpoints": 3,
        "device": "cpu",
        "tensorboard": False,
    }
    base_train.update(train)
    return {
        "description": "tiny test recipe",
        "method": {"name": "kd", "temperature": 2.0, "kd_ratio": 0.5},
        "teacher": {"path": str(teacher)},
        "student": {"config": {"num_hidden_layers": 1}, "init": "teacher-layers"},
        "data": {"source": str(corpus), "seq_len": 16, "eval_tokens": 256},
        "train": base_train,
    }


@pytest.fixture()
def write_recipe(tmp_path):
    import yaml

    def _write(data: dict, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data))
        return path

    return _write


@pytest.fixture(autouse=True)
def _fresh_host(monkeypatch):
    from stillroom.core.host import reset_host

    monkeypatch.setenv("PYTHONHASHSEED", "0")
    reset_host()
    yield
    reset_host()


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.update(extra)
    return env


# -- tiny diffusers teachers (class- and text-conditional) and a labelled image folder ------------
@pytest.fixture(scope="session")
def label_folder(tmp_path_factory) -> Path:
    return build_label_folder(tmp_path_factory.mktemp("labels"))


@pytest.fixture(scope="session")
def class_teacher(tmp_path_factory) -> Path:
    return build_class_teacher(tmp_path_factory.mktemp("class_teacher"))


@pytest.fixture(scope="session")
def text_teacher(tmp_path_factory) -> Path:
    return build_text_teacher(tmp_path_factory.mktemp("text_teacher"))
