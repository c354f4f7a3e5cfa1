"""Plugin discovery: built-ins, installed entry points, broken plugins, STILLROOM_PLUGINS."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from stillroom.core.errors import StillroomError
from stillroom.core.host import Host


def fake_dist(root: Path, name: str, module_source: str) -> None:
    """An installed distribution with a ``stillroom`` entry point, without pip."""
    mod = f"{name.replace('-', '_')}_plugin"
    (root / f"{mod}.py").write_text(textwrap.dedent(module_source))
    info = root / f"{name.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[stillroom]\n{name} = {mod}\n")


GOOD = """
from stillroom.core.hookspecs import hookimpl
from stillroom.plugins.lm.methods.kd import KD

class Echo(KD):
    name = "echo-kd"

@hookimpl
def register_methods(register):
    register(Echo)

@hookimpl
def register_runtimes(register):
    register("echo-runtime", object)
"""

BROKEN_IMPORT = "raise RuntimeError('boom at import')\n"

BROKEN_REGISTER = """
from stillroom.core.hookspecs import hookimpl

@hookimpl
def register_methods(register):
    register(type("Half", (), {"name": "half"}))
    raise ValueError('boom in register')
"""

BROKEN_HOOK = """
from stillroom.core.hookspecs import hookimpl

@hookimpl
def on_step_end(run, step, metrics):
    raise KeyError('tracker down')
"""


@pytest.fixture()
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.endswith("_plugin")]:
        sys.modules.pop(name)


def test_builtins_are_entry_points():
    host = Host()
    infos = {i.name: i for i in host.infos()}
    assert infos["lm"].builtin and "kd" in infos["lm"].methods and infos["lm"].error is None
    assert infos["lm"].hooks == ["register_methods"] or "register_methods" in infos["lm"].hooks


def test_installed_plugin_registers_and_broken_ones_are_isolated(site):
    fake_dist(site, "good", GOOD)
    fake_dist(site, "bad-import", BROKEN_IMPORT)
    fake_dist(site, "bad-register", BROKEN_REGISTER)
    host = Host()
    infos = {i.name: i for i in host.infos()}
    assert infos["good"].methods == ["echo-kd"] and infos["good"].version == "1.2.3"
    assert infos["good"].runtimes == ["echo-runtime"]
    assert "RuntimeError: boom at import" in infos["bad-import"].error
    assert "register_methods: ValueError: boom in register" in infos["bad-register"].error
    assert "half" not in host.registry["methods"]  # a failed registration leaves nothing half-done
    assert host.method("kd") is not None and host.method("echo-kd").name == "echo-kd"


def test_stillroom_plugins_restricts_installed_plugins(site, monkeypatch):
    fake_dist(site, "good", GOOD)
    fake_dist(site, "bad-import", BROKEN_IMPORT)
    monkeypatch.setenv("STILLROOM_PLUGINS", "good")
    names = {i.name for i in Host().infos()}
    assert "good" in names and "bad-import" not in names and "lm" in names
    monkeypatch.setenv("STILLROOM_PLUGINS", "")
    names = {i.name for i in Host().infos()}
    assert "good" not in names and "lm" in names


def test_lifecycle_hook_failure_names_the_plugin(site):
    fake_dist(site, "tracker", BROKEN_HOOK)
    host = Host()
    with pytest.raises(StillroomError, match="plugin 'tracker' failed in on_step_end: KeyError"):
        host.call("on_step_end", run=None, step=1, metrics={})


def test_unknown_method_lists_available():
    with pytest.raises(StillroomError, match="unknown method 'x'.*available: .*kd"):
        Host().method("x")
