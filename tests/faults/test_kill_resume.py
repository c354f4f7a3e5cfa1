"""kill -9 a real `stillroom distill` mid-run, resume, and get bitwise the uninterrupted student."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import STILLROOM, cli_env, lm_recipe

STEPS = 24


def distill(recipe: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [STILLROOM, "distill", str(recipe), "--out", str(out), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )


def last_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    try:
        return json.loads(lines[-1])["step"] if lines else 0
    except json.JSONDecodeError:  # a line being written right now
        return 0


def kill_at(recipe: Path, out: Path, step: int) -> None:
    proc = distill(recipe, out)
    deadline = time.monotonic() + 120
    while last_step(out) < step and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, f"run ended before step {step}: {proc.stderr.read()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def kill_during_checkpoint_write(recipe: Path, out: Path) -> None:
    """Kills the moment a checkpoint's temporary directory exists (a write is in progress)."""
    proc = distill(recipe, out)
    ckpts = out / "checkpoints"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if any(name.endswith(".tmp") for name in os.listdir(ckpts)):
                os.kill(proc.pid, signal.SIGKILL)
                break
        except FileNotFoundError:
            pass
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before a checkpoint write was caught"


def weights(student: Path) -> dict[str, torch.Tensor]:
    return load_file(student / "model.safetensors")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_teacher, corpus_dir):
    root = tmp_path_factory.mktemp("ref")
    recipe = root / "recipe.yaml"
    import yaml

    recipe.write_text(
        yaml.safe_dump(
            lm_recipe(tiny_teacher, corpus_dir, steps=STEPS, checkpoint_every=1, ema=0.9, lr=0.003)
        )
    )
    proc = distill(recipe, root / "run")
    assert proc.wait() == 0, proc.stderr.read()
    return recipe, weights(root / "run" / "student")


@pytest.mark.parametrize("kill_step", [1, 7, 12, 19, "checkpoint-write"])
def test_kill9_then_resume_is_bitwise_identical(tmp_path, reference, kill_step):
    recipe, expected = reference
    out = tmp_path / "run"
    if kill_step == "checkpoint-write":
        kill_during_checkpoint_write(recipe, out)
    else:
        kill_at(recipe, out, kill_step)
    assert not (out / "student").exists()
    proc = distill(recipe, out, "--resume")
    assert proc.wait() == 0, proc.stderr.read()
    got = weights(out / "student")
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "final" not in r]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS
