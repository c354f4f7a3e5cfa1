"""Damaged artifacts and student directories through the CLI: one line naming the file, exit 1, no traceback.

`stillroom serve`, `stillroom bench` and `stillroom export` are run on copies of the session's tiny
artifacts / students after truncating, overwriting or re-hashing a file, or after pointing the
manifest outside the artifact (``..``, absolute paths, symlinks). A damage that still reached the
serving loop or returned a result would be a silent failure, so serving is replaced by a tripwire.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from stillroom import cli
from stillroom.core import artifact as artifacts
from tests.conftest import STILLROOM, cli_env
from tests.faults.conftest import copy_tree


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def garbage(path: Path) -> None:
    path.write_bytes(b"\x00\xffnot what you think\x13" * 11)


def rehash(root: Path) -> None:
    """Re-writes the manifest's hashes so only the loader's own checks can catch the damage."""
    manifest = artifacts.read_manifest(root)
    artifacts.write_manifest(root, manifest)


def edit_manifest(root: Path, **changes) -> None:
    data = json.loads((root / "manifest.json").read_text())
    for key, value in changes.items():
        data[key] = value(data) if callable(value) else value
    (root / "manifest.json").write_text(json.dumps(data))


def run_cli(capsys, monkeypatch, *argv: str) -> str:
    """``stillroom ARGV`` in this process; returns stderr, asserting exit 1 and a single line."""
    import stillroom.serve.server.run as run_mod

    def tripwire(*_a, **_k):
        raise AssertionError("a damaged artifact reached the server loop")

    monkeypatch.setattr(run_mod, "serve_forever", tripwire)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(list(argv))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1, err
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


# (name, which artifact, damage(root) -> the file or phrase the error must name)
def _onnx_truncated(root):
    truncate(root / "model.onnx")
    return "model.onnx"


def _onnx_garbage_rehashed(root):
    garbage(root / "model.onnx")
    rehash(root)
    return "model.onnx"


def _onnx_missing(root):
    (root / "model.onnx").unlink()
    return "model.onnx"


def _manifest_truncated(root):
    truncate(root / "manifest.json")
    return "manifest.json"


def _manifest_garbage(root):
    garbage(root / "manifest.json")
    return "manifest.json"


def _manifest_not_object(root):
    (root / "manifest.json").write_text("[1, 2, 3]")
    return "manifest.json"


def _manifest_wrong_kind(root):
    edit_manifest(root, kind="spreadsheet")
    return "manifest.json"


def _manifest_removed(root):
    (root / "manifest.json").unlink()
    return "manifest.json"


def _tokenizer_garbage_rehashed(root):
    garbage(root / "tokenizer" / "tokenizer.json")
    rehash(root)
    return "tokenizer"


def _escape_dotdot(root):
    edit_manifest(root, graphs={"model": "../model.onnx"})
    return "escapes the artifact directory"


def _escape_absolute(root):
    edit_manifest(root, graphs={"model": str((root / "model.onnx").resolve())})
    return "escapes the artifact directory"


def _escape_files_entry(root):
    entry = {"path": "../../etc/passwd", "sha256": "0" * 64, "bytes": 1}
    edit_manifest(root, files=lambda d: [*d["files"], entry])
    return "escapes the artifact directory"


def _escape_symlink(root):
    outside = root.parent / f"{root.name}-outside.onnx"
    (root / "model.onnx").rename(outside)
    (root / "model.onnx").symlink_to(outside)
    return "escapes the artifact directory"


def _escape_tokenizer(root):
    edit_manifest(root, tokenizer="/etc")
    return "escapes the artifact directory"


LM_DAMAGE = [
    _onnx_truncated,
    _onnx_garbage_rehashed,
    _onnx_missing,
    _manifest_truncated,
    _manifest_garbage,
    _manifest_not_object,
    _manifest_wrong_kind,
    _manifest_removed,
    _tokenizer_garbage_rehashed,
    _escape_dotdot,
    _escape_absolute,
    _escape_files_entry,
    _escape_symlink,
    _escape_tokenizer,
]
GEN_DAMAGE = [_onnx_truncated, _onnx_garbage_rehashed, _manifest_truncated, _escape_dotdot, _escape_symlink]


@pytest.mark.parametrize("damage", LM_DAMAGE, ids=lambda f: f.__name__.strip("_"))
def test_serve_refuses_damaged_lm_artifact(damage, lm_art, tmp_path, capsys, monkeypatch):
    root = copy_tree(lm_art, tmp_path / "art")
    named = damage(root)
    err = run_cli(capsys, monkeypatch, "serve", str(root), "--provider", "cpu", "--port", "0")
    assert named in err


@pytest.mark.parametrize("damage", GEN_DAMAGE, ids=lambda f: f.__name__.strip("_"))
def test_serve_refuses_damaged_generator_artifact(damage, gen_art, tmp_path, capsys, monkeypatch):
    root = copy_tree(gen_art, tmp_path / "art")
    named = damage(root)
    err = run_cli(capsys, monkeypatch, "serve", str(root), "--provider", "cpu", "--port", "0")
    assert named in err


@pytest.mark.parametrize(
    "damage", [_onnx_truncated, _manifest_garbage, _escape_dotdot], ids=lambda f: f.__name__.strip("_")
)
def test_bench_refuses_damaged_artifact(damage, lm_art, tmp_path, capsys, monkeypatch):
    root = copy_tree(lm_art, tmp_path / "art")
    named = damage(root)
    err = run_cli(
        capsys,
        monkeypatch,
        "bench",
        str(root),
        "--out",
        str(tmp_path / "report"),
        "--batch",
        "1",
        "--repeats",
        "1",
        "--warmup",
        "0",
    )
    assert named in err
    assert not (tmp_path / "report" / "report.json").exists()


def _weights_truncated(root):
    truncate(root / "model.safetensors")
    return "model.safetensors"


def _weights_garbage(root):
    garbage(root / "model.safetensors")
    return "model.safetensors"


def _weights_header_lies(root):
    """A valid header whose tensors claim more bytes than the file holds."""
    path = root / "model.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    path.write_bytes(data[: 8 + n] + data[8 + n : 8 + n + 16])
    return "model.safetensors"


def _config_garbage(root):
    garbage(root / "config.json")
    return "config.json"


def _unet_weights_truncated(root):
    truncate(next((root / "unet").glob("*.safetensors")))
    return "unet"


@pytest.mark.parametrize(
    "damage",
    [_weights_truncated, _weights_garbage, _weights_header_lies, _config_garbage],
    ids=lambda f: f.__name__.strip("_"),
)
def test_export_refuses_damaged_lm_student(damage, lm_student, tmp_path, capsys, monkeypatch):
    src = copy_tree(lm_student, tmp_path / "student")
    named = damage(src)
    err = run_cli(capsys, monkeypatch, "export", str(src), "--out", str(tmp_path / "out"))
    assert named in err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_export_refuses_damaged_generator_student(gen_student, tmp_path, capsys, monkeypatch):
    src = copy_tree(gen_student, tmp_path / "student")
    named = _unet_weights_truncated(src)
    err = run_cli(capsys, monkeypatch, "export", str(src), "--out", str(tmp_path / "out"))
    assert named in err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_real_process_prints_one_line_for_damaged_artifact(lm_art, tmp_path):
    """The same through a real `stillroom serve` process: stderr is one line, the exit status is 1."""
    root = copy_tree(lm_art, tmp_path / "art")
    _onnx_truncated(root)
    proc = subprocess.run(
        [STILLROOM, "serve", str(root), "--port", "0"],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "model.onnx" in lines[0], proc.stderr
