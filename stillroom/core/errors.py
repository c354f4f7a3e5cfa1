"""User-facing errors: one line that says what went wrong and what to do next.

The CLI turns a `StillroomError` into that line and a non-zero exit; any other exception is a bug
and keeps its traceback (shown with `--debug`).
"""

from __future__ import annotations


class StillroomError(Exception):
    """An error the user can fix; `str(err)` is the whole message, on one line."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        self.message = " ".join(message.split())
        self.hint = " ".join(hint.split()) if hint else None
        super().__init__(f"{self.message} ({self.hint})" if self.hint else self.message)
