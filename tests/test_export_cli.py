"""`stillroom export` end to end through the CLI and the plugin host."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import STILLROOM, cli_env
from tests.test_host import fake_dist

FAKE_EXPORTER = """
from pathlib import Path

from stillroom import hookimpl


def fake(src, out, **options):
    from stillroom.core import artifact

    Path(out).mkdir(parents=True)
    (Path(out) / "source.txt").write_text(str(src))
    manifest = artifact.Manifest(kind="causal-lm", format="fake", exporter="fake", extra=options)
    artifact.write_manifest(Path(out), manifest)
    return artifact.load(out)


@hookimpl
def register_exporters(register):
    register("fake", fake)
"""


def test_exporters_are_registered():
    from stillroom.core.host import get_host

    host = get_host()
    assert {"onnx", "tensorrt", "triton"} <= set(host.registry["exporters"])


def test_a_plugins_exporter_is_a_choice_of_export_to(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    fake_dist(site, "fakeexp", FAKE_EXPORTER)
    env = cli_env(PYTHONPATH=str(site))

    def run(*args):
        return subprocess.run([STILLROOM, *args], capture_output=True, text=True, env=env, timeout=120)

    assert "--to [diffusers|fake|onnx|tensorrt|triton]" in run("export", "--help").stdout
    plugins = {p["name"]: p for p in json.loads(run("plugins", "--json").stdout)}
    assert plugins["fakeexp"]["exporters"] == ["fake"]
    (tmp_path / "src").mkdir()
    out = run("export", str(tmp_path / "src"), "--to", "fake", "--int8", "--out", str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["exporter"] == "fake" and manifest["extra"]["int8"] is True
    assert (tmp_path / "out" / "source.txt").read_text() == str(tmp_path / "src")


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
    repo = artifact.load(tmp_path / "out")
    assert repo.manifest.format == "triton" and repo.manifest.validation["passed"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "kd_lm",
        "kd_lm_generate",
        "manifest.json",
    ]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # the ONNX staging is gone
    onnx_art = artifact.load(tmp_path / "out" / "kd_lm_generate" / "1" / "artifact")
    assert onnx_art.manifest.format == "onnx" and onnx_art.manifest.provenance.source["type"] == "run"


@pytest.fixture(scope="module")
def tiny_lm_export(tmp_path_factory):
    """A tiny LM run exported once through the CLI without --debug, as a user sees it."""
    import json

    from stillroom.testing import build_tiny_lm

    root = tmp_path_factory.mktemp("export")
    build_tiny_lm(root / "run" / "student", "gpt2")
    (root / "run" / "run.json").write_text(json.dumps({"method": "kd", "steps": 1, "student": "student"}))
    proc = subprocess.run(
        [STILLROOM, "export", str(root / "run"), "--out", str(root / "out")],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return root / "out", proc


def test_export_ends_with_a_rounded_table(tiny_lm_export):
    from stillroom.core import artifact

    out, proc = tiny_lm_export
    validation = artifact.load(out).manifest.validation
    lines = [line.strip("│ ") for line in proc.stdout.strip().splitlines()]
    assert str(out) in lines[0] and lines[-1].startswith("╰")
    assert (
        f"max_abs_diff          {validation['max_abs_diff']:.4g} (tolerance {validation['tolerance']:.4g})"
        in (lines)
    )
    assert "validation            PASSED" in lines
    assert "{'" not in proc.stdout + proc.stderr  # no raw dict: not the command's, not a family's


def test_export_without_debug_shows_no_library_warnings(tiny_lm_export):
    _, proc = tiny_lm_export
    assert "warning" not in proc.stderr.lower(), proc.stderr


def test_warnings_are_filtered_only_without_debug(monkeypatch):
    import os
    import warnings

    from stillroom.cli import _setup_logging

    for debug in (False, True):
        monkeypatch.delenv("PYTHONWARNINGS", raising=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            _setup_logging(debug)
            warnings.warn("from a library", FutureWarning, stacklevel=1)
        assert len(caught) == (1 if debug else 0)
        assert ("PYTHONWARNINGS" in os.environ) is not debug  # what the bench workers inherit
