"""The `stillroom` command as a user runs it: one-line errors, plugins JSON, a real plugin package."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO, STILLROOM, cli_env, lm_recipe


def run(*args, env=None, cwd=None):
    return subprocess.run(
        [STILLROOM, *args], capture_output=True, text=True, env=env or cli_env(), cwd=cwd, timeout=300
    )


def test_plugins_json_lists_builtins():
    out = run("plugins", "--json")
    assert out.returncode == 0, out.stderr
    plugins = {p["name"]: p for p in json.loads(out.stdout)}
    assert set(plugins["lm"]) >= {"name", "version", "hooks", "methods", "exporters", "runtimes", "error"}
    assert "kd" in plugins["lm"]["methods"] and plugins["lm"]["error"] is None
    assert plugins["lm"]["families"] == ["lm"] and plugins["lm"]["metrics"] == ["perplexity"]
    assert plugins["diffusion"]["metrics"] == ["fid_like"]
    assert plugins["export"]["exporters"] == ["onnx", "tensorrt", "triton"]
    assert plugins["selectors"]["data_selectors"] == ["kd3", "active", "prune_kd"]
    table = run("plugins").stdout
    assert "families" in table and "metrics" in table and "perplexity" in table


def test_user_errors_are_one_line_with_nonzero_exit(tmp_path, tiny_teacher, corpus_dir, write_recipe):
    recipe = write_recipe(lm_recipe(tiny_teacher, corpus_dir))
    cases = {
        ("method.name=nope",): "error: unknown method 'nope' (available:",
        ("train.lr_rate=1",): "error: recipe key 'train.lr_rate' is not accepted (accepted: steps,",
        ("teacher.path=./no/such/teacher",): "error: teacher path './no/such/teacher' does not exist",
    }
    for overrides, expected in cases.items():
        out = run("distill", str(recipe), *overrides, "--out", str(tmp_path / "r"))
        assert out.returncode == 1
        assert out.stderr.startswith(expected), out.stderr
        assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    out = run("distill", str(recipe), "--out", str(tmp_path / "empty"), "--resume")
    assert out.returncode == 1 and "nothing to resume" in out.stderr
    out = run("run", str(recipe), "export.to=nope", "--out", str(tmp_path / "r"))
    assert out.returncode == 1 and out.stderr.count("\n") == 1
    expected = "error: recipe key 'export.to': unknown exporter 'nope' (available: diffusers, onnx,"
    assert out.stderr.startswith(expected)
    out = run("--debug", "distill", str(recipe), "method.name=nope", "--out", str(tmp_path / "r"))
    assert out.returncode != 0 and "Traceback" in out.stderr
    assert not (tmp_path / "r").exists()


def test_example_plugin_installs_and_trains(tmp_path, tiny_teacher, corpus_dir, write_recipe):
    target = tmp_path / "site"
    pip = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(target),
            str(REPO / "examples" / "plugin-example"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert pip.returncode == 0, pip.stderr
    env = cli_env(PYTHONPATH=str(target))
    plugins = {p["name"]: p for p in json.loads(run("plugins", "--json", env=env).stdout)}
    assert plugins["logit-mse"]["methods"] == ["logit-mse"] and plugins["logit-mse"]["builtin"] is False
    data = lm_recipe(tiny_teacher, corpus_dir, steps=8, checkpoint_every=0)
    data["method"] = {"name": "logit-mse", "ce_weight": 0.0}
    out = run("distill", str(write_recipe(data)), "--out", str(tmp_path / "run"), env=env)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    mse = [r["mse"] for r in rows if "mse" in r]
    assert len(mse) == 8 and mse[-1] < mse[0]
    assert yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["method"]["name"] == "logit-mse"


def test_every_option_of_every_command_has_help_text():
    import click

    from stillroom.cli import cli
    from stillroom.core.host import get_host

    get_host().add_commands(cli)
    missing = [
        f"{name} {'/'.join(p.opts)}"
        for name, command in sorted(cli.commands.items())
        for p in command.params
        if isinstance(p, click.Option) and not p.help
    ]
    assert set(cli.commands) >= {"distill", "run", "export", "bench", "serve", "demo", "plugins"}
    assert not missing, missing


def test_serve_without_the_http_stack_names_the_extra(tmp_path, monkeypatch, capsys):
    from stillroom.cli import main

    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if the serve extra were not installed
    for module in [m for m in sys.modules if m.startswith("stillroom.serve.server")]:
        monkeypatch.delitem(sys.modules, module)
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and len(err.splitlines()) == 1
    assert "pip install 'stillroom[serve]'" in err and "fastapi" in err
