"""What stillroom writes honours the process umask, as any tool's output does (issue 16).

Atomic writes go through a temporary sibling; ``tempfile.mkstemp`` / ``mkdtemp`` would make that
sibling 0600 / 0700 whatever the umask, leaving exported artifacts and run folders unreadable by
other users and by containers running as another uid.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from stillroom.core import fsio

# umask -> (file mode, folder mode) that any tool creates under it
MODES = {0o022: (0o644, 0o755), 0o077: (0o600, 0o700)}


@pytest.fixture(params=sorted(MODES), ids=lambda mask: f"umask{mask:03o}")
def umask(request):
    """Runs the test under the given umask and restores the previous one even if the test fails.

    The umask belongs to the whole process and pytest runs every test in this one, so a leaked
    mask would change the modes of everything the later tests write.
    """
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def tree_modes(root: Path) -> dict[str, int]:
    """Mode of ``root`` and of everything under it, keyed by the path relative to ``root``."""
    return {str(p.relative_to(root)): mode(p) for p in [root, *root.rglob("*")]}


def test_write_text_and_json_follow_umask(tmp_path, umask):
    file_mode, _ = MODES[umask]
    fsio.write_text(tmp_path / "a.txt", "hello\n")
    fsio.write_json(tmp_path / "nested" / "b.json", {"x": 1})
    assert mode(tmp_path / "a.txt") == file_mode
    assert mode(tmp_path / "nested" / "b.json") == file_mode
    assert not list(tmp_path.rglob("*.tmp")), "the temporary sibling was left behind"


def test_overwrite_takes_the_umask_not_the_old_mode(tmp_path, umask):
    file_mode, _ = MODES[umask]
    target = tmp_path / "a.txt"
    target.write_text("old")
    target.chmod(0o400)
    fsio.write_text(target, "new")
    assert target.read_text() == "new"
    assert mode(target) == file_mode


def test_atomic_dir_follows_umask_and_keeps_it_on_overwrite(tmp_path, umask):
    file_mode, dir_mode = MODES[umask]
    final = tmp_path / "artifact"
    expected = {".": dir_mode, "sub": dir_mode, "data.bin": file_mode, "sub/manifest.json": file_mode}
    for payload in (b"first", b"second"):
        with fsio.atomic_dir(final) as tmp:
            (tmp / "data.bin").write_bytes(payload)
            (tmp / "sub").mkdir()
            fsio.write_json(tmp / "sub" / "manifest.json", {"payload": payload.decode()})
        assert (final / "data.bin").read_bytes() == payload
        assert tree_modes(final) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"], "staging or .old left behind"


@pytest.mark.parametrize("umask", [0o022], indirect=True, ids=["umask022"])
def test_exported_lm_artifact_is_readable_by_others(tmp_path, umask):
    """A real export (transformers, torch.onnx, ORT, the manifest) ends up 0644 / 0755 throughout."""
    from stillroom.plugins.lm.export.onnx_artifact import export_causal_lm
    from stillroom.testing import build_tiny_lm

    out = tmp_path / "artifact"
    export_causal_lm(build_tiny_lm(tmp_path / "lm"), out)
    modes = tree_modes(out)
    assert "manifest.json" in modes
    wrong = {name: oct(m) for name, m in modes.items() if m != (0o755 if (out / name).is_dir() else 0o644)}
    assert not wrong, f"entries not readable as umask 022 says: {wrong}"
