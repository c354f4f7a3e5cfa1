"""`stillroom run`: a recipe's train -> export -> bench stages, and a re-run that skips every one."""

from __future__ import annotations

import json
import subprocess

import pytest

from stillroom.core import artifact
from stillroom.core.errors import StillroomError
from tests.conftest import STILLROOM, cli_env, lm_recipe


def stillroom_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [STILLROOM, "run", *args], capture_output=True, text=True, env=cli_env(), timeout=600
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_teacher, corpus_dir):
    """One `stillroom run` of a tiny LM recipe: 2 steps, int8 export, a short onnxruntime bench."""
    import yaml

    root = tmp_path_factory.mktemp("pipeline")
    data = lm_recipe(tiny_teacher, corpus_dir, steps=2, checkpoint_every=0)
    data["export"] = {"to": "onnx", "int8": True}
    data["bench"] = {"batch": [1], "warmup": 0, "repeats": 2, "new_tokens": 4, "prompt_tokens": 8}
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    proc = stillroom_run(str(recipe), "--out", str(root / "run"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return recipe, root / "run", proc


def test_every_stage_leaves_its_result(finished):
    _, run, proc = finished
    assert json.loads((run / "run.json").read_text())["steps"] == 2
    assert (run / "student" / "model.safetensors").is_file()
    art = artifact.load(run / "artifact")  # verifies every sha256
    assert art.kind == "causal-lm" and art.manifest.precision == "int8"
    assert art.manifest.provenance.source["type"] == "run" and art.manifest.validation["passed"]
    report = json.loads((run / "bench" / "report.json").read_text())
    assert report["teacher"]["name"] == "teacher" and (run / "bench" / "report.html").is_file()
    (student,) = report["students"]
    assert student["runtime"] == "onnxruntime" and student["batch"] == 1 and student["speedup_p50"] > 0
    assert "[skip]" not in proc.stderr and "report in" in proc.stderr


def test_rerun_skips_every_stage(finished):
    recipe, run, _ = finished
    outputs = [run / "run.json", run / "artifact" / "manifest.json", run / "bench" / "report.json"]
    before = [p.stat().st_mtime_ns for p in outputs]
    proc = stillroom_run(str(recipe), "--out", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("[skip]") == 3, proc.stderr
    assert [p.stat().st_mtime_ns for p in outputs] == before


def test_rerun_with_another_recipe_is_refused(finished):
    recipe, run, _ = finished
    proc = stillroom_run(str(recipe), "export.int8=false", "--out", str(run))
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"error: '{run}' was started with a different recipe")
    assert proc.stderr.count("\n") == 1


def test_a_damaged_artifact_is_exported_again(tmp_path, monkeypatch):
    """The export stage reuses only an artifact that verifies; anything else goes to the exporter."""
    from stillroom import pipeline

    with pytest.raises(StillroomError, match="unknown exporter 'nope'"):
        pipeline.export_stage(tmp_path, tmp_path / "other", "x", "nope")
    calls = []
    monkeypatch.setattr(pipeline, "export_model", lambda src, out, to, **o: calls.append((to, o)) or "new")
    (tmp_path / "artifact").mkdir()
    (tmp_path / "artifact" / "manifest.json").write_text("{not json")
    assert pipeline.export_stage(tmp_path, tmp_path / "artifact", "x", "onnx", int8=True) == "new"
    assert calls == [("onnx", {"int8": True})]


def test_a_run_from_an_older_stillroom_is_not_a_different_recipe(tmp_path, tiny_teacher, corpus_dir):
    """A field added since (at its default) or a reworded description is the same recipe; a changed
    value is not."""
    import yaml

    from stillroom.core import recipe as recipes
    from stillroom.pipeline import _check_same_recipe

    recipe = recipes.validate(lm_recipe(tiny_teacher, corpus_dir))
    older = recipe.to_dict()
    del older["export"]["with_teacher"]  # what a run folder of a stillroom before --with-teacher holds
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(older))
    _check_same_recipe(recipe, tmp_path)
    older["description"] = "reworded since"  # documentation, not a setting
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(older))
    _check_same_recipe(recipe, tmp_path)
    older["train"]["steps"] += 1
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(older))
    with pytest.raises(StillroomError, match="was started with a different recipe"):
        _check_same_recipe(recipe, tmp_path)
