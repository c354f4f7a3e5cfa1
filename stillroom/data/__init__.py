"""Small embedded defaults shipped with the package (corpus, images, teachers, classifier).

Recipes name them as ``embedded:NAME`` (e.g. ``embedded:lm_teacher``); ``resolve`` turns such a name
into a directory inside the installed package and leaves anything else untouched.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

PREFIX = "embedded:"


def root() -> Path:
    return Path(str(resources.files(__name__)))


def available() -> list[str]:
    return sorted(p.name for p in root().iterdir() if p.is_dir() and not p.name.startswith("_"))


def heldout_text() -> str:
    """The held-out split of the embedded Shakespeare corpus ("" when the asset is missing)."""
    path = root() / "shakespeare" / "valid.txt"
    return path.read_text(encoding="utf-8") if path.is_file() else ""


def resolve(spec: str) -> str:
    """``embedded:NAME`` -> absolute path of that shipped asset; other specs unchanged."""
    if not spec.startswith(PREFIX):
        return spec
    from stillroom.core.errors import StillroomError

    name = spec[len(PREFIX) :]
    path = root() / name
    if not path.exists():
        raise StillroomError(f"no embedded asset '{name}'", f"available: {', '.join(available()) or 'none'}")
    return str(path)


def locate(spec: str, role: str) -> str:
    """Resolves ``embedded:`` names and checks that local paths exist (anything else is a hub id).

    A spec that looks like a path but does not exist is an error naming the path, never a hub lookup.
    """
    from stillroom.core.errors import StillroomError

    resolved = resolve(spec)
    path = Path(resolved).expanduser()
    looks_local = resolved.startswith((".", "/", "~")) or path.exists() or resolved.count("/") > 1
    if looks_local and not path.exists():
        raise StillroomError(
            f"{role} path '{spec}' does not exist", "give a local model directory or a hub id"
        )
    return str(path) if path.exists() else resolved


def image_npz(spec: str, role: str) -> Path:
    """The .npz image file behind ``spec`` (``embedded:NAME`` is the asset folder's ``NAME.npz``), with
    ``train_images`` / ``train_labels`` / ``eval_images`` / ``eval_labels``; ``role`` names it in errors."""
    from stillroom.core.errors import StillroomError

    path = Path(resolve(spec)).expanduser()
    if path.is_dir():
        path = path / f"{path.name}.npz"
    if path.suffix != ".npz" or not path.is_file():
        raise StillroomError(
            f"{role} '{spec}' is not an .npz file",
            "use embedded:mnist or an .npz with train_images, train_labels, eval_images, eval_labels",
        )
    return path
