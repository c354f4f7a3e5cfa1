"""Plugin discovery: built-ins, installed entry points, broken plugins, STILLROOM_PLUGINS."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import click
import pytest

from stillroom.core.errors import StillroomError
from stillroom.core.host import Host, get_host
from stillroom.core.registry_choice import RegistryChoice


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

CLASH = """
from stillroom.core.hookspecs import hookimpl
from stillroom.plugins.lm.methods.kd import KD

class Mine(KD):
    name = "kd"

@hookimpl
def register_methods(register):
    register(Mine)
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
    assert infos["lm"].families == ["lm"] and infos["lm"].metrics == ["perplexity"]
    assert infos["diffusion"].families == ["diffusion"] and infos["diffusion"].metrics == ["fid_like"]
    assert host.family_of_kind("causal-lm").metric == "perplexity"


def test_a_kind_is_registered_when_first_read_without_importing_torch():
    """`stillroom export --help` reads the exporters only; the methods (and torch) stay unimported."""
    code = (
        "import sys; from stillroom.core.host import get_host; host = get_host();"
        "exporters = sorted(host.registry['exporters']);"
        "print(exporters, 'methods' in host.registry, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "['diffusers', 'onnx', 'tensorrt', 'triton'] False False", out.stderr


def test_registry_choice_follows_the_host(site):
    fake_dist(site, "good", GOOD)
    choice = RegistryChoice("runtimes", separator=",")
    assert choice.choices == ("echo-runtime", "onnxruntime", "tensorrt", "torch")
    assert choice.convert("torch, echo-runtime", None, None) == ("torch", "echo-runtime")
    with pytest.raises(StillroomError, match=r"unknown runtime 'nope' \(available: echo-runtime, onnx"):
        choice.convert("torch,nope", None, None)
    option = click.Option(["--to"], type=RegistryChoice("exporters"))
    metavar = option.type.get_metavar(option, click.Context(click.Command("x")))
    assert metavar == "[diffusers|onnx|tensorrt|triton]"
    assert get_host().lookup("exporters", "onnx") is get_host().exporter("onnx")


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


def test_a_plugin_reusing_a_registered_name_fails_and_keeps_the_first(site):
    fake_dist(site, "clash", CLASH)
    host = Host()
    info = {i.name: i for i in host.infos()}["clash"]
    assert "method 'kd' is already registered by plugin 'lm'; rename one of them" in info.error
    assert host.method("kd").__module__ == "stillroom.plugins.lm.methods.kd"


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
