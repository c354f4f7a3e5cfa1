"""Checkpoints that were tampered with, truncated or replaced by a malicious pickle are refused."""

from __future__ import annotations

import os
import pickle

import pytest

from stillroom.core import checkpoint
from stillroom.core import recipe as recipes
from stillroom.core.errors import StillroomError
from stillroom.core.trainer import Trainer
from tests.conftest import lm_recipe


class Exploit:
    """Unpickling this runs `os.system` — the attack weights_only=True must stop."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture()
def finished_run(tmp_path, tiny_teacher, corpus_dir):
    rec = recipes.validate(lm_recipe(tiny_teacher, corpus_dir, steps=4, checkpoint_every=2))
    Trainer(rec, tmp_path / "run").fit()
    return rec, tmp_path / "run", checkpoint.list_checkpoints(tmp_path / "run" / "checkpoints")[-1]


@pytest.mark.parametrize("target", ["optim.pt", "rng.pt"])
def test_malicious_pickle_is_refused_and_never_runs(finished_run, tmp_path, target):
    rec, run, latest = finished_run
    marker = tmp_path / "pwned"
    with open(latest / target, "wb") as fh:
        pickle.dump({"optimizers": Exploit(marker)}, fh)
    with pytest.raises(
        StillroomError, match=f"checkpoint file '.*{target}' holds objects that are not plain"
    ):
        Trainer(rec, run).fit(resume=True)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("target", "damage"),
    [
        ("student.safetensors", "truncate"),
        ("student.safetensors", "garbage"),
        ("optim.pt", "truncate"),
        ("rng.pt", "garbage"),
        ("state.json", "garbage"),
    ],
)
def test_corrupt_checkpoint_files_are_named(finished_run, target, damage):
    rec, run, latest = finished_run
    path = latest / target
    if damage == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    else:
        path.write_bytes(b"\x00garbage\xff" * 7)
    with pytest.raises(StillroomError) as info:
        Trainer(rec, run).fit(resume=True)
    message = str(info.value)
    assert target in message and "\n" not in message
