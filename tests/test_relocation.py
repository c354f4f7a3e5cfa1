"""An artifact is self-contained: moved elsewhere, with its run, teacher and data deleted, it still
inspects (every sha256), benches against its teacher and serves.

The student is a real 2-step KD run of the tiny LM; the export copies its teacher in
(``--with-teacher``). Everything the run knew is then deleted, so any read of the run folder, the
teacher's old path or the training data would fail the test.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import httpx
import pytest
import yaml

from stillroom.core import artifact
from tests.conftest import STILLROOM, cli_env, lm_recipe


def stillroom(*args: str) -> subprocess.CompletedProcess:
    env = cli_env(COLUMNS="500")  # log lines unwrapped
    return subprocess.run([STILLROOM, *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def moved(tmp_path_factory, tiny_teacher, corpus_dir):
    """The artifact of a finished run, moved away from everything it came from, which is deleted."""
    work = tmp_path_factory.mktemp("work")
    teacher, corpus = work / "teacher", work / "corpus"
    shutil.copytree(tiny_teacher, teacher)
    shutil.copytree(corpus_dir, corpus)
    recipe = work / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(lm_recipe(teacher, corpus, steps=2, checkpoint_every=0)))
    for args in (
        ("distill", str(recipe), "--out", str(work / "run")),
        ("export", str(work / "run"), "--to", "onnx", "--with-teacher", "--out", str(work / "art")),
    ):
        proc = stillroom(*args)
        assert proc.returncode == 0, proc.stderr[-3000:]
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "art"
    shutil.move(work / "art", elsewhere)
    shutil.rmtree(work)  # run, teacher, data, recipe: all gone
    return elsewhere, str(teacher), str(corpus)


def test_manifest_is_typed_and_records_where_it_came_from(moved):
    root, teacher, corpus = moved
    m = artifact.load(root).manifest  # verifies every file's sha256 after the move
    assert (m.kind, m.family, m.task, m.teacher) == ("causal-lm", "lm", "text-generation", "teacher")
    assert m.spec["layers"] == 1 and m.spec["vocab_size"] == 320 and m.spec["eos_token_ids"]
    p = m.provenance
    assert (p.method, p.teacher, p.data, p.train_steps) == ("kd", teacher, corpus, 2)
    assert len(p.recipe_sha256) == 64 and p.created and "onnxruntime" in p.versions
    assert (root / "teacher" / "config.json").is_file()
    assert "teacher/model.safetensors" in {f.path for f in m.files}  # hashed like the graphs


def test_inspect_verifies_the_moved_artifact(moved):
    proc = stillroom("inspect", str(moved[0]))
    assert proc.returncode == 0, proc.stderr
    assert "verified" in proc.stdout and "text-generation" in proc.stdout


def test_bench_uses_the_teacher_inside_and_warns_about_the_missing_data(moved, tmp_path):
    root = moved[0]
    proc = stillroom(
        "bench", str(root), "--out", str(tmp_path / "rep"), "--batch", "1", "--warmup", "0",
        "--repeats", "1", "--new-tokens", "4", "--prompt-tokens", "8",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["teacher"]["spec"] == str(root / "teacher") and "error" not in report["teacher"]
    (student,) = report["students"]
    assert "error" not in student and student["quality"]["perplexity"] > 0
    assert student["quality"]["top1_agreement"] is not None  # same tokenizer as the bundled teacher
    assert "does not exist" in proc.stderr and "embedded:shakespeare" in proc.stderr


def test_serve_answers_from_the_moved_artifact(moved):
    from stillroom.serve.runtimes import onnxruntime_runtime
    from stillroom.serve.server.app import ServerSettings, create_app
    from stillroom.serve.server.run import ServerThread

    model = onnxruntime_runtime(moved[0], provider="cpu", name="moved")
    assert (
        model.info["context_length"]
        == json.loads((moved[0] / "config.json").read_text())["max_position_embeddings"]
    )
    with ServerThread(create_app(model, ServerSettings())) as server:
        r = httpx.post(
            f"{server.url}/v1/completions",
            json={"model": "moved", "prompt": "To be", "max_tokens": 4, "temperature": 0},
            timeout=60,
        )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


def test_torch_runtime_refuses_an_artifact_in_one_line(moved, tmp_path):
    proc = stillroom(
        "bench", str(moved[0]), "--runtime", "torch", "--out", str(tmp_path / "rep"), "--batch", "1"
    )
    report = json.loads((tmp_path / "rep" / "report.json").read_text()) if proc.returncode == 0 else {}
    text = proc.stderr + json.dumps(report)
    assert "is an exported artifact; the torch runtime runs a PyTorch model directory" in text
