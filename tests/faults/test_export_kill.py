"""kill -9 of a real `stillroom export` while it writes: no manifest at the output, and a re-run
produces a valid artifact (and clears the staging folder the killed run left beside it)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from stillroom.core import artifact as artifacts
from stillroom.core.errors import StillroomError
from tests.conftest import STILLROOM, cli_env

# where the kill lands: the first graph file being written, or after validation just before the manifest
POINTS = {
    "graph-write": lambda staging: (staging / ".stage-fp32" / "model.onnx").exists(),
    "before-manifest": lambda staging: (staging / "tokenizer").is_dir(),
}


def export(src: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([STILLROOM, "export", str(src), "--out", str(out)], env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_when(proc: subprocess.Popen, out: Path, reached) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if any(reached(s) for s in out.parent.glob(f".{out.name}.*.tmp")):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the export finished before the kill point was reached"


@pytest.mark.parametrize("point", [
    "before-manifest", pytest.param("graph-write", marks=pytest.mark.slow),
])
def test_killed_export_leaves_no_manifest_and_rerun_is_valid(point, lm_student, tmp_path):
    out = tmp_path / "exports" / "lm"
    kill_when(export(lm_student, out), out, POINTS[point])
    assert not (out / "manifest.json").exists() and not out.exists()
    with pytest.raises(StillroomError, match="(does not exist|no manifest)"):
        artifacts.load(out)
    rerun = export(lm_student, out)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    loaded = artifacts.load(out)  # every file hashed against the manifest
    assert loaded.kind == "causal-lm" and loaded.manifest.validation["passed"] is True
    assert sorted(p.name for p in out.parent.iterdir()) == ["lm"]  # the killed run's staging is gone
