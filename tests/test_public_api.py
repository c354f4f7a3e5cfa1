"""The public API: lazy, complete, and enough to write a plugin with (the example plugin uses no more)."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys

import pytest
import yaml

import stillroom
from tests.conftest import REPO, lm_recipe

EXAMPLE = REPO / "examples" / "plugin-example"
HEAVY = ("torch", "onnxruntime", "transformers", "diffusers")


def modules_after(code: str) -> set[str]:
    """Which heavy modules a fresh interpreter has imported after ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_import_stillroom_and_help_stay_light():
    assert modules_after("import stillroom; stillroom.hookimpl; stillroom.Params") == set()
    help_code = (
        "from stillroom.cli import main\n"
        "for argv in (['--help'], ['export', '--help'], ['bench', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass"
    )
    assert modules_after(help_code) == set()


def test_every_public_name_resolves():
    for name in stillroom.__all__:
        assert getattr(stillroom, name) is not None, name
    assert set(stillroom.__all__) <= set(dir(stillroom))
    assert {"Method", "Params", "Role", "Phase", "StepOutput", "hookimpl", "load_recipe", "train"} <= set(
        stillroom.__all__
    )
    assert {"export_model", "bench", "StillroomError", "LMMethod"} <= set(stillroom.__all__)
    from stillroom.core.method import Method

    assert stillroom.Method is Method and issubclass(stillroom.LMMethod, Method)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        stillroom.nope  # noqa: B018


def test_the_example_plugin_imports_only_public_names():
    allowed_modules = {"__future__", "torch", "pydantic", "stillroom_logit_mse", "stillroom_logit_mse.method"}
    sources = sorted((EXAMPLE / "stillroom_logit_mse").glob("*.py"))
    assert len(sources) == 2
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] in {"torch", "pydantic"} for a in node.names), path
            elif isinstance(node, ast.ImportFrom) and node.module == "stillroom":
                assert {a.name for a in node.names} <= set(stillroom.__all__), path
            elif isinstance(node, ast.ImportFrom):
                assert node.module in allowed_modules or node.module.split(".")[0] in {"torch", "pydantic"}, (
                    f"{path.name} imports {node.module}"
                )


@pytest.fixture()
def example_plugin(tmp_path, monkeypatch):
    """The example plugin installed as pip would (its package and a dist-info naming its entry point)."""
    site = tmp_path / "site"
    shutil.copytree(EXAMPLE / "stillroom_logit_mse", site / "stillroom_logit_mse")
    info = site / "stillroom_logit_mse-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: stillroom-logit-mse\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[stillroom]\nlogit-mse = stillroom_logit_mse\n")
    monkeypatch.syspath_prepend(str(site))
    yield site
    for name in [m for m in sys.modules if m.startswith("stillroom_logit_mse")]:
        sys.modules.pop(name)


def test_a_plugin_written_against_the_public_api_trains(
    example_plugin, tmp_path, tiny_teacher, corpus_dir, write_recipe
):
    from stillroom.core.host import get_host

    assert get_host().plugins["logit-mse"].version == "0.1.0"
    data = lm_recipe(tiny_teacher, corpus_dir, steps=6, checkpoint_every=0)
    data["method"] = {"name": "logit-mse"}
    recipe = stillroom.load_recipe(write_recipe(data), ["method.ce_weight=0.0"])
    assert type(recipe.method).__name__ == "LogitMSEParams"
    student = stillroom.train(recipe, tmp_path / "run")
    assert (student / "model.safetensors").is_file() and (student / "stillroom.json").is_file()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    mse = [r["mse"] for r in rows if "mse" in r]
    assert len(mse) == 6 and mse[-1] < mse[0]
    saved = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    assert saved["method"] == {"name": "logit-mse", "ce_weight": 0.0}
