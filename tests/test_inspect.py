"""`stillroom inspect` on real tiny LM and generator artifacts: the table, --json, and damaged input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from stillroom import cli
from stillroom.core import artifact as artifacts


@pytest.fixture(scope="module")
def arts(tmp_path_factory) -> dict[str, Path]:
    """One exported causal LM and one one-step generator, shared by every test here (~30 s)."""
    from stillroom.plugins.diffusion.export import export_generator
    from stillroom.plugins.lm.export.onnx_artifact import export_causal_lm
    from stillroom.testing import build_tiny_generator, build_tiny_lm

    tmp = tmp_path_factory.mktemp("inspect")
    build_tiny_lm(tmp / "lm")
    export_causal_lm(tmp / "lm", tmp / "art")
    build_tiny_generator(tmp / "g", steps=1)
    export_generator(tmp / "g", tmp / "gart")
    return {"lm": tmp / "art", "generator": tmp / "gart"}


def inspect(capsys, *argv: str) -> str:
    """``stillroom inspect ARGV`` in this process; returns stdout of a successful run."""
    cli.main(["inspect", *argv])
    return capsys.readouterr().out


def inspect_fails(capsys, *argv: str) -> str:
    """``stillroom inspect ARGV`` that must fail: exit 1 and one ``error:`` line on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["inspect", *argv])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1, err
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def lines(out: str) -> list[str]:
    """The printed lines without table and panel borders, for key/value lookups."""
    stripped = (line.strip("│┃ ") for line in out.splitlines())
    return [line for line in stripped if line and line[0] not in "╭╰┏┡└"]


def test_lm_table_names_graphs_inputs_cache_and_validation(arts, capsys):
    out = inspect(capsys, str(arts["lm"]))
    rows = {line.split()[0]: line.split()[1:] for line in lines(out)}
    assert rows["kind"] == ["causal-lm"] and rows["family"] == ["lm"] and rows["variant"] == ["kv-cache"]
    for text in ("model.onnx", "input_ids", "past_key_values.0.key", "logits"):
        assert text in out, text
    assert "[batch_size, sequence_length]" in out  # dim names survive rich's markup parsing
    assert rows["task"] == ["text-generation"]
    assert rows["head_dim"] == ["8"] and rows["kv_heads"] == ["2"]  # the typed spec, family unnamed
    assert "timesteps" not in rows
    assert rows["passed"] == ["yes"] and rows["stages"] == ["fp32"]
    figure = json.loads((arts["lm"] / "manifest.json").read_text())["validation"]["max_abs_diff"]
    assert rows["max_abs_diff"] == [f"{figure:.4g}"] != [str(figure)]  # 4 significant digits
    assert "greedy_first_divergence" not in rows  # per-prompt lists are for --json
    assert "versions.onnxruntime" in rows and rows["sha256"] == ["verified"]


def test_generator_table_shows_sampler_spec_and_no_variant(arts, capsys):
    out = inspect(capsys, str(arts["generator"]))
    rows = {line.split()[0]: line.split()[1:] for line in lines(out)}
    assert rows["kind"] == ["generator"] and rows["family"] == ["diffusion"] and rows["variant"] == ["—"]
    assert "noise" in out and "class_labels" in out
    assert rows["task"] == ["class-conditional-image-generation"]
    assert "spec" in rows and rows["timesteps"] == ["[999]"] and rows["steps"] == ["1"]
    assert rows["prediction"] == ["epsilon"] and "created" in rows
    assert "head_dim" not in rows and rows["passed"] == ["yes"]


def test_json_sizes_match_the_manifest(arts, capsys):
    for name, root in arts.items():
        data = json.loads(inspect(capsys, str(root), "--json"))
        manifest = json.loads((root / "manifest.json").read_text())
        assert data["manifest"] == manifest, name
        assert data["files_bytes"] == sum(f["bytes"] for f in manifest["files"]) > 0
        assert data["files_count"] == len(manifest["files"])
        assert data["family"] == {"lm": "lm", "generator": "diffusion"}[name]
        assert set(data["graph_bytes"]) == set(manifest["graphs"])


def test_graph_size_counts_external_data(arts, tmp_path, capsys):
    root = tmp_path / "ext"
    shutil.copytree(arts["generator"], root)
    (root / "model.onnx.data").write_bytes(b"\0" * 1000)
    artifacts.write_manifest(root, artifacts.read_manifest(root))
    data = json.loads(inspect(capsys, str(root), "--json"))
    assert data["graph_bytes"]["model"] == (root / "model.onnx").stat().st_size + 1000
    assert data["files_bytes"] == data["graph_bytes"]["model"] and data["files_count"] == 2


def test_unknown_kind_still_prints(arts, tmp_path, capsys):
    root = tmp_path / "mystery"
    shutil.copytree(arts["generator"], root)
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**manifest, "kind": "mystery"}))
    assert "no installed family reads it" in inspect(capsys, str(root))
    assert json.loads(inspect(capsys, str(root), "--json"))["family"] is None


def test_folder_without_manifest_is_one_line_error(tmp_path, capsys):
    (tmp_path / "half").mkdir()
    assert "has no manifest.json" in inspect_fails(capsys, str(tmp_path / "half"))
    assert "does not exist" in inspect_fails(capsys, str(tmp_path / "nowhere"))


def test_tampered_file_fails_unless_no_verify(arts, tmp_path, capsys):
    root = tmp_path / "tampered"
    shutil.copytree(arts["lm"], root)
    graph = bytearray((root / "model.onnx").read_bytes())
    graph[-1] ^= 0xFF
    (root / "model.onnx").write_bytes(bytes(graph))
    err = inspect_fails(capsys, str(root))
    assert "model.onnx" in err and "sha256" in err
    out = inspect(capsys, str(root), "--no-verify")
    assert "input_ids" in out and "not checked (--no-verify)" in out
