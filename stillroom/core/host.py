"""The plugin host: one pluggy PluginManager holding the built-in and the installed plugins.

Plugins are modules named by entry points in the group ``stillroom``. stillroom's own plugins are
declared in its pyproject.toml exactly like a third-party package declares its own, so the built-ins
are the reference for the API. ``STILLROOM_PLUGINS=a,b`` restricts which *installed* (non built-in)
plugins load; built-ins always load. A plugin that fails to import, or raises while registering, is
recorded with its error and skipped: the others keep working and ``stillroom plugins`` shows why.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from importlib import metadata
from pathlib import Path
from typing import Any

import pluggy

from stillroom.core import hookspecs
from stillroom.core.errors import StillroomError

log = logging.getLogger(__name__)

GROUP = "stillroom"
BUILTIN_DIST = "stillroom"
KINDS = ("families", "methods", "exporters", "runtimes", "metrics", "data_selectors")
NOUNS = {
    "families": "family",
    "methods": "method",
    "exporters": "exporter",
    "runtimes": "runtime",
    "metrics": "metric",
    "data_selectors": "data selector",
}


@dataclass
class PluginInfo:
    """What `stillroom plugins --json` reports for one plugin."""

    name: str
    version: str | None
    builtin: bool
    hooks: list[str] = field(default_factory=list)
    families: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    exporters: list[str] = field(default_factory=list)
    runtimes: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    data_selectors: list[str] = field(default_factory=list)
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "builtin": self.builtin,
            "hooks": self.hooks,
            "families": self.families,
            "methods": self.methods,
            "exporters": self.exporters,
            "runtimes": self.runtimes,
            "metrics": self.metrics,
            "data_selectors": self.data_selectors,
            "error": self.error,
        }


def _error_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


class Host:
    """Loads plugins once and answers: which families, methods, exporters, runtimes, metrics and data
    selectors exist."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self._load_entry_points()

    def _load_entry_points(self) -> None:
        allowed = os.environ.get("STILLROOM_PLUGINS")
        allow = {n.strip() for n in allowed.split(",") if n.strip()} if allowed is not None else None
        eps = sorted(metadata.entry_points(group=GROUP), key=lambda ep: ep.name)
        for ep in eps:
            dist = ep.dist.name if ep.dist is not None else None
            builtin = dist == BUILTIN_DIST
            if not builtin and allow is not None and ep.name not in allow:
                continue
            if ep.name in self.plugins:
                continue
            info = PluginInfo(ep.name, ep.dist.version if ep.dist else None, builtin)
            self.plugins[ep.name] = info
            try:
                module = importlib.import_module(ep.value)
                self.pm.register(module, name=ep.name)
            except Exception as err:  # a broken plugin must not take the others down
                info.error = _error_line(err)
                log.warning("plugin %s failed to load: %s", ep.name, info.error)
                continue
            info.hooks = self._hooks_of(module)

    def register(self, module: Any, name: str) -> None:
        """Register an in-process plugin module (tests and embedding applications)."""
        self.pm.register(module, name=name)
        self.plugins[name] = PluginInfo(name, None, False, hooks=self._hooks_of(module))
        self.__dict__.pop("registry", None)

    def _hooks_of(self, module: Any) -> list[str]:
        return sorted(caller.name for caller in self.pm.get_hookcallers(module) or [])

    @cached_property
    def registry(self) -> dict[str, dict[str, Any]]:
        """``kind -> {name: object}``; a kind's ``register_*`` hooks run when it is first read, so
        ``stillroom export --help`` lists exporters without importing the methods (and torch)."""
        return _Tables(self._fill)

    def _fill(self, kind: str) -> dict[str, Any]:
        """Calls every ``register_<kind>`` hook, one plugin at a time so a failure is attributed."""
        table: dict[str, Any] = {}
        owners: dict[str, str] = {}
        caller = getattr(self.pm.hook, f"register_{kind}")
        for impl in reversed(caller.get_hookimpls()):
            info = self.plugins.get(impl.plugin_name)
            names: list[str] = []

            def register(*args: Any, _names: list[str] = names, _plugin: str = impl.plugin_name) -> None:
                name, obj = _registration(kind, args)
                if name in table:
                    raise ValueError(
                        f"{NOUNS[kind]} '{name}' is already registered by plugin '{owners[name]}'; "
                        f"rename one of them"
                    )
                table[name] = obj
                owners[name] = _plugin
                _names.append(name)

            try:
                impl.function(register=register)
            except Exception as err:
                for name in names:
                    table.pop(name, None)
                if info is not None:
                    info.error = f"register_{kind}: {_error_line(err)}"
                log.warning("plugin %s failed in register_%s: %s", impl.plugin_name, kind, err)
                continue
            if info is not None:
                getattr(info, kind).extend(names)
        return table

    def method(self, name: str) -> type:
        return self.lookup("methods", name)

    def metric(self, name: str) -> Callable[..., Any]:
        return self.lookup("metrics", name)

    def families(self) -> list[Any]:
        """Every registered family (a ``stillroom.core.family.Family`` instance): installed plugins'
        first, then the built-ins, each by name, so a plugin's family is asked before a built-in one
        that claims broadly (e.g. every spec that is not a local path, taken as a hub id)."""
        table = self.registry["families"]
        builtin = {n for info in self.plugins.values() if info.builtin for n in info.families}
        return [table[n] for n in sorted(table, key=lambda n: (n in builtin, n))]

    def family_of_kind(self, kind: str, where: str = "") -> Any:
        """The family whose artifacts have ``kind`` (``where``: the manifest that says so, for errors)."""
        for family in self.families():
            if family.kind == kind:
                return family
        known = ", ".join(f"{f.kind} ({f.name})" for f in self.families()) or "none"
        raise StillroomError(
            f"{where or 'the artifact'} has kind '{kind}', which no installed family reads",
            f"known kinds: {known}; install the family's plugin or re-export",
        )

    def output_family(self, path: str | Path) -> Any | None:
        """The family that claims ``path`` when its output is not a model (``Family.exports`` is False:
        the run folder is the artifact, e.g. a distilled dataset); None for anything else."""
        from stillroom.data import resolve

        where = Path(resolve(str(path))).expanduser()
        return next((f for f in self.families() if not f.exports and f.claims(where)), None)

    def family_for_target(self, target: str) -> Any:
        """The family of a runtime target: an artifact (by its kind) or a model directory / spec.

        A target no family claims (a hub id, say) goes to the family that claims non-local specs.
        """
        from stillroom.core import artifact
        from stillroom.data import resolve

        path = Path(resolve(str(target))).expanduser()
        if (path / artifact.MANIFEST).is_file():
            return self.family_of_kind(artifact.read_manifest(path).kind, str(path / artifact.MANIFEST))
        for family in self.families():
            if family.claims(path):
                return family
        if path.is_dir():
            artifact.read_manifest(path)  # an unfinished or damaged artifact: say that, in one line
        raise StillroomError(
            f"no installed family can load '{target}'",
            "give an artifact directory or a model directory (`stillroom plugins` lists families)",
        )

    def exporter(self, name: str) -> Callable[..., Any]:
        return self.lookup("exporters", name)

    def runtime(self, name: str) -> Callable[..., Any]:
        return self.lookup("runtimes", name)

    def lookup(self, kind: str, name: str) -> Any:
        """The object registered as ``name`` in ``kind``; else one line listing what is registered."""
        table = self.registry[kind]
        if name not in table:
            known = ", ".join(sorted(table)) or "none"
            raise StillroomError(
                f"unknown {NOUNS[kind]} '{name}'",
                f"available: {known}; `stillroom plugins` shows what is installed",
            )
        return table[name]

    def add_commands(self, cli: Any) -> None:
        for impl in self.pm.hook.register_commands.get_hookimpls():
            try:
                impl.function(cli=cli)
            except Exception as err:
                info = self.plugins.get(impl.plugin_name)
                if info is not None:
                    info.error = f"register_commands: {_error_line(err)}"
                log.warning("plugin %s failed in register_commands: %s", impl.plugin_name, err)

    def call(self, hook: str, **kwargs: Any) -> None:
        """Run a lifecycle hook; a plugin that raises stops the run with its name."""
        for impl in reversed(getattr(self.pm.hook, hook).get_hookimpls()):
            try:
                impl.function(**{k: kwargs[k] for k in impl.argnames})
            except StillroomError:
                raise
            except Exception as err:
                raise StillroomError(
                    f"plugin '{impl.plugin_name}' failed in {hook}: {_error_line(err)}",
                    "fix or uninstall the plugin, or exclude it with STILLROOM_PLUGINS",
                ) from err

    def infos(self) -> list[PluginInfo]:
        for kind in KINDS:  # fills the per-plugin registration lists
            self.registry[kind]  # noqa: B018
        return sorted(self.plugins.values(), key=lambda p: (not p.builtin, p.name))


class _Tables(dict):
    """The registry: a dict that fills a kind the first time it is read."""

    def __init__(self, fill: Callable[[str], dict[str, Any]]) -> None:
        super().__init__()
        self._fill = fill

    def __missing__(self, kind: str) -> dict[str, Any]:
        if kind not in KINDS:
            raise KeyError(kind)
        table = self[kind] = self._fill(kind)
        return table


def _registration(kind: str, args: tuple[Any, ...]) -> tuple[str, Any]:
    if kind == "families":
        (cls,) = args
        family = cls() if isinstance(cls, type) else cls
        if not getattr(family, "name", "") or not getattr(family, "kind", ""):
            raise TypeError(f"family {cls!r} has no `name` or `kind`")
        return family.name, family
    if kind in ("methods", "data_selectors"):
        (cls,) = args
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{NOUNS[kind]} class {cls!r} has no `name`")
        return name, cls
    name, obj = args
    return str(name), obj


_HOST: Host | None = None


def get_host() -> Host:
    """The process-wide host (plugins are loaded on first use)."""
    global _HOST
    if _HOST is None:
        _HOST = Host()
    return _HOST


def reset_host() -> None:
    """Forget the loaded plugins (tests that change entry points or STILLROOM_PLUGINS)."""
    global _HOST
    _HOST = None
