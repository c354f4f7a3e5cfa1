"""`stillroom export` end to end through the CLI and the plugin host."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import STILLROOM, cli_env


def test_exporters_are_registered():
    from stillroom.core.host import get_host

    host = get_host()
    assert {"onnx", "tensorrt", "triton"} <= set(host.registry["exporters"])


def test_export_of_unrecognised_directory_is_one_line_error(tmp_path):
    (tmp_path / "src").mkdir()
    proc = subprocess.run(
        [STILLROOM, "export", str(tmp_path / "src"), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=120,
    )
    assert proc.returncode == 1
    assert (
        proc.stderr.strip().startswith("error: cannot tell what")
        and len(proc.stderr.strip().splitlines()) == 1
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_exports_lm_run_to_onnx_and_triton(tmp_path):
    import json

    from stillroom.core import artifact
    from stillroom.testing import build_tiny_lm

    run = tmp_path / "run"
    build_tiny_lm(run / "student", "gpt2")
    (run / "run.json").write_text(json.dumps({"method": "kd", "steps": 1, "student": "student"}))
    proc = subprocess.run(
        [STILLROOM, "export", str(run), "--to", "triton", "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    onnx_art = artifact.load(tmp_path / "out" / "onnx")
    assert onnx_art.manifest.source["type"] == "run" and onnx_art.manifest.validation["passed"]
    assert artifact.load(tmp_path / "out" / "triton").manifest.format == "triton"
