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


def resolve(spec: str) -> str:
    """``embedded:NAME`` -> absolute path of that shipped asset; other specs unchanged."""
    if not spec.startswith(PREFIX):
        return spec
    from stillroom.core.errors import StillroomError

    name = spec[len(PREFIX):]
    path = root() / name
    if not path.exists():
        raise StillroomError(f"no embedded asset '{name}'", f"available: {', '.join(available()) or 'none'}")
    return str(path)
