"""Writes that never leave a half-written file or directory behind.

Everything stillroom writes goes to a temporary sibling first and is renamed into place: a crash
leaves either the old state or the new one, never a torn one.

Permissions follow the process umask like any other tool's output (0644 files and 0755 folders under
umask 022, 0600 / 0700 under 077), so artifacts and run folders can be read by other users and by
containers running as another uid. ``tempfile.mkstemp`` / ``mkdtemp`` cannot give that: they always
create 0600 / 0700, because they are meant for private scratch space, not for outputs.

The temporaries are therefore created with ``os.open(..., O_CREAT | O_EXCL, 0o666)`` and
``os.mkdir(..., 0o777)``, and the kernel applies the umask at creation. That is why nothing here
reads the umask: Python can read it only by setting it (``os.umask(0); os.umask(old)``), which
briefly changes it for every thread of the process, so a file another thread creates in that window
would come out world-writable; ``/proc/self/status`` avoids that but exists only on Linux. Letting
the kernel apply the mask has neither problem, and it also honours a folder's default ACL, exactly
as ``cp`` or ``touch`` would, which an explicit ``chmod(0o666 & ~umask)`` would override.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

_NAME_TRIES = 100
"""Fresh random names to try before giving up; with 48 random bits a clash is already unlikely."""


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _create_sibling(final: Path, create: Callable[[Path], Any]) -> tuple[Path, Any]:
    """Creates ``.NAME.<random>.tmp`` beside ``final`` with ``create``, which must fail if it exists.

    The ``.NAME.*.tmp`` shape is what :func:`remove_stale_temps` and ``stillroom export`` look for
    when they clean up after a killed write.
    """
    for _ in range(_NAME_TRIES):
        tmp = final.with_name(f".{final.name}.{secrets.token_hex(6)}.tmp")
        try:
            return tmp, create(tmp)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside '{final}' after {_NAME_TRIES} tries")


def write_bytes(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically; the file gets ``0o666`` less the umask (see module doc)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_BINARY: without it Windows would open the descriptor in text mode and rewrite newlines.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    tmp, fd = _create_sibling(path, lambda name: os.open(name, flags, 0o666))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yields a temporary directory that replaces ``final`` only if the block succeeds.

    The directory gets ``0o777`` less the umask (see the module doc); what the block writes inside
    it with ordinary ``open`` / ``mkdir`` (``save_pretrained``, ONNX exporters, ``shutil``, or
    :func:`write_bytes`) honours the umask by itself, so the whole tree ends up readable as the
    umask says.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp, _ = _create_sibling(final, lambda name: os.mkdir(name, 0o777))
    try:
        yield tmp
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(root, name), "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temps(directory: Path) -> None:
    """Deletes the ``.name.*.tmp`` leftovers of writes that a crash interrupted."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        if entry.name.startswith(".") and (entry.name.endswith(".tmp") or entry.name.endswith(".old")):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
