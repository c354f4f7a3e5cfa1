"""An installed plugin that raises, through a real `stillroom distill` process.

The plugin is a fake installed distribution (a ``.dist-info`` with a ``stillroom`` entry point) on
PYTHONPATH; ``FAULTY_HOOK`` says where it raises. A lifecycle hook that raises stops the run with
exit 1 and one line naming the plugin and the hook, and leaves a run that resumes; a plugin that
fails to import or raises in a ``register_*`` hook is skipped, reported by `stillroom plugins`, and
the run completes without it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import STILLROOM, cli_env, lm_recipe
from tests.test_host import fake_dist

PLUGIN = """
import os

from stillroom.core.hookspecs import hookimpl

FAULTY = set(os.environ.get("FAULTY_HOOK", "").split(","))
if "import" in FAULTY:
    raise ImportError("faulty plugin cannot import its tracker")


def _maybe_raise(hook):
    if hook in FAULTY:
        raise RuntimeError(f"injected failure in {hook}")


@hookimpl
def register_methods(register):
    _maybe_raise("register_methods")


@hookimpl
def register_exporters(register):
    _maybe_raise("register_exporters")


@hookimpl
def register_commands(cli):
    _maybe_raise("register_commands")


@hookimpl
def on_train_start(run):
    _maybe_raise("on_train_start")


@hookimpl
def on_step_end(run, step, metrics):
    _maybe_raise("on_step_end")


@hookimpl
def on_checkpoint(run, step, path):
    _maybe_raise("on_checkpoint")


@hookimpl
def on_train_end(run, student_dir):
    _maybe_raise("on_train_end")
"""

LIFECYCLE = ["on_step_end", "on_checkpoint"]  # in the default run (started in parallel)
LIFECYCLE_SLOW = ["on_train_start", "on_train_end"]  # the same `Host.call` path, run with -m slow
SKIPPED = "register_methods,register_commands"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("site")
    fake_dist(root, "faulty", PLUGIN)
    return root


def env(site: Path, faulty: str) -> dict[str, str]:
    return cli_env(PYTHONPATH=str(site), FAULTY_HOOK=faulty)


def start(site: Path, recipe: Path, out: Path, faulty: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [STILLROOM, "distill", str(recipe), "--out", str(out), *extra],
        env=env(site, faulty),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_all(site: Path, root: Path, teacher: Path, corpus: Path, hooks: list[str]):
    """Faulty runs started at once (they are independent), then collected."""
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(lm_recipe(teacher, corpus, steps=3, checkpoint_every=2)))
    procs = {hook: (start(site, recipe, root / hook, hook), root / hook) for hook in hooks}
    done = {}
    for hook, (proc, out) in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        done[hook] = (proc.returncode, stdout + stderr, out)
    return recipe, done


@pytest.fixture(scope="module")
def runs(site, tmp_path_factory, tiny_teacher, corpus_dir):
    root = tmp_path_factory.mktemp("plugin-runs")
    return run_all(site, root, tiny_teacher, corpus_dir, [*LIFECYCLE, SKIPPED])


def assert_stopped_by(done, hook: str) -> None:
    code, output, _ = done[hook]
    assert code == 1, output
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output
    assert f"plugin 'faulty' failed in {hook}: RuntimeError: injected failure in {hook}" in errors[0]


@pytest.mark.parametrize("hook", LIFECYCLE)
def test_lifecycle_hook_failure_stops_the_run_with_the_plugins_name(runs, hook):
    assert_stopped_by(runs[1], hook)


@pytest.mark.slow
def test_every_other_lifecycle_hook_failure_stops_the_run(site, tmp_path, tiny_teacher, corpus_dir):
    _, done = run_all(site, tmp_path, tiny_teacher, corpus_dir, LIFECYCLE_SLOW)
    for hook in LIFECYCLE_SLOW:
        assert_stopped_by(done, hook)


def test_stopped_run_resumes_once_the_plugin_behaves(runs, site):
    recipe, done = runs
    out = done["on_checkpoint"][2]
    proc = start(site, recipe, out, "", "--resume")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout + stderr
    assert (out / "student" / "model.safetensors").is_file() and (out / "run.json").is_file()


def listed_plugins(site: Path, faulty: str, **extra: str) -> dict[str, dict]:
    listed = subprocess.run(
        [STILLROOM, "plugins", "--json"],
        env={**env(site, faulty), **extra},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    # the CLI's log handler writes warnings to stdout too (reported); the JSON list starts at "["
    out = listed.stdout
    text = out if out.startswith("[\n") else out[out.index("\n[\n") + 1 :]
    return {p["name"]: p for p in json.loads(text)}


def test_plugin_raising_in_register_hooks_is_skipped_and_the_run_completes(runs, site):
    code, output, out = runs[1][SKIPPED]
    assert code == 0, output
    assert "Traceback" not in output
    assert (out / "student" / "model.safetensors").is_file()
    info = listed_plugins(site, SKIPPED)["faulty"]
    assert info["error"].startswith("register_methods: RuntimeError: injected failure")
    assert not info["builtin"]


def test_plugin_failing_to_import_is_listed_with_its_error(site):
    info = listed_plugins(site, "import")["faulty"]
    assert info["error"] == "ImportError: faulty plugin cannot import its tracker"


def test_stillroom_plugins_env_excludes_the_faulty_plugin(site, tmp_path):
    names = set(listed_plugins(site, "import", STILLROOM_PLUGINS=""))
    assert "faulty" not in names and {"lm", "export", "serve"} <= names


def test_plugin_raising_in_register_exporters_leaves_the_built_in_choices(site):
    """`--to` reads the registry when click renders it: the built-ins are there, the plugin's error too."""
    helped = subprocess.run(
        [STILLROOM, "export", "--help"],
        env=env(site, "register_exporters"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert helped.returncode == 0, helped.stderr
    assert "--to [diffusers|onnx|tensorrt|triton]" in helped.stdout and "Traceback" not in helped.stderr
    info = listed_plugins(site, "register_exporters")["faulty"]
    assert info["error"].startswith("register_exporters: RuntimeError: injected failure")
