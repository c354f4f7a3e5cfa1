"""torchrun with 2 CPU processes (gloo): ranks end identical and match one process on the joint batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import STILLROOM, VENV_BIN, cli_env, lm_recipe


def test_two_process_ddp_matches_single_process_on_the_global_batch(tmp_path, tiny_teacher, corpus_dir):
    ddp_recipe = tmp_path / "ddp.yaml"
    ddp_recipe.write_text(
        yaml.safe_dump(lm_recipe(tiny_teacher, corpus_dir, steps=5, batch_size=2, lr=0.003))
    )
    single_recipe = tmp_path / "single.yaml"
    single_recipe.write_text(
        yaml.safe_dump(lm_recipe(tiny_teacher, corpus_dir, steps=5, batch_size=4, lr=0.003))
    )
    proc = subprocess.Popen(
        [
            str(VENV_BIN / "torchrun"),
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "stillroom",
            "distill",
            str(ddp_recipe),
            "--out",
            str(tmp_path / "ddp"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun's workers too, never left behind
        raise
    assert proc.returncode == 0, stderr[-3000:]
    run = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert run["world_size"] == 2
    assert len(run["replica_checksums"]) == 2 and len(set(run["replica_checksums"])) == 1
    single = subprocess.run(
        [STILLROOM, "distill", str(single_recipe), "--out", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=300,
    )
    assert single.returncode == 0, single.stderr
    a = load_file(tmp_path / "ddp" / "student" / "model.safetensors")
    b = load_file(tmp_path / "one" / "student" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
