"""The command-line face of the registries: a click choice whose values are what plugins registered."""

from __future__ import annotations

from typing import Any

import click

from stillroom.core.host import get_host


class RegistryChoice(click.Choice):
    """A ``click.Choice`` over one registry, read when click uses it (help, parsing, completion) rather
    than when the command is defined, so an installed plugin's exporter or runtime is offered and
    accepted exactly like a built-in one.

    A name that is not registered raises the host's ``StillroomError`` (not click's usage error): the
    same one line a recipe or an API call gets for the same mistake. With ``separator`` one value may
    name several (``--runtime onnxruntime,torch``) and converts to a tuple.
    """

    def __init__(self, kind: str, separator: str | None = None) -> None:
        self.kind, self.separator = kind, separator
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(sorted(get_host().registry[self.kind]))

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        names = (
            [n.strip() for n in str(value).split(self.separator) if n.strip()] if self.separator else [value]
        )
        for name in names:
            get_host().lookup(self.kind, str(name))
        return tuple(names) if self.separator else value
