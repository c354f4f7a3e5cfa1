"""kill -9 of a real `stillroom export` while it writes: no manifest at the output, and a re-run
produces a valid artifact (and clears the staging folder the killed run left beside it)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stillroom.core import artifact as artifacts
from stillroom.core.errors import StillroomError
from tests.conftest import STILLROOM, cli_env

# The real CLI, except that writing the manifest (after validation passed and every file is staged)
# first drops a marker and waits to be killed: the window between the last file and the manifest is
# milliseconds, too short to hit by polling on an idle machine.
HOLD_BEFORE_MANIFEST = """
import pathlib, sys, time
from stillroom.core import artifact
def hold(root, manifest):
    pathlib.Path(root, "reached-manifest").touch()
    time.sleep(600)
artifact.write_manifest = hold
from stillroom.cli import main
sys.argv = ["stillroom", *sys.argv[1:]]
main()
"""

# where the kill lands: the first graph file being written, or after validation just before the manifest
POINTS = {
    "graph-write": lambda staging: (staging / ".stage-fp32" / "model.onnx").exists(),
    "before-manifest": lambda staging: (staging / "reached-manifest").exists(),
}


def export(src: Path, out: Path, hold: bool = False) -> subprocess.Popen:
    command = [sys.executable, "-c", HOLD_BEFORE_MANIFEST] if hold else [STILLROOM]
    return subprocess.Popen(
        [*command, "export", str(src), "--out", str(out)],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill_when(proc: subprocess.Popen, out: Path, reached) -> None:
    deadline, hit = time.monotonic() + 240, False
    while time.monotonic() < deadline and proc.poll() is None:
        if any(reached(s) for s in out.parent.glob(f".{out.name}.*.tmp")):
            proc.send_signal(signal.SIGKILL)
            hit = True
            break
        time.sleep(0.01)
    if proc.poll() is None and not hit:
        proc.kill()
    _, err = proc.communicate()
    assert hit and proc.returncode == -signal.SIGKILL, f"the export ended before the kill point: {err[-500:]}"


@pytest.mark.parametrize(
    "point",
    [
        "before-manifest",
        pytest.param("graph-write", marks=pytest.mark.slow),
    ],
)
def test_killed_export_leaves_no_manifest_and_rerun_is_valid(point, lm_student, tmp_path):
    out = tmp_path / "exports" / "lm"
    kill_when(export(lm_student, out, hold=point == "before-manifest"), out, POINTS[point])
    assert not (out / "manifest.json").exists() and not out.exists()
    with pytest.raises(StillroomError, match="(does not exist|no manifest)"):
        artifacts.load(out)
    rerun = export(lm_student, out)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    loaded = artifacts.load(out)  # every file hashed against the manifest
    assert loaded.kind == "causal-lm" and loaded.manifest.validation["passed"] is True
    assert sorted(p.name for p in out.parent.iterdir()) == ["lm"]  # the killed run's staging is gone
