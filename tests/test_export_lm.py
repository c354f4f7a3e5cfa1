"""KV-cache LM export: validated graph, Optimum names, tampering refused, Triton config, sources."""

from __future__ import annotations

import importlib.util
import json
import shutil
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch

from stillroom.core import artifact
from stillroom.core.errors import StillroomError
from stillroom.testing import build_tiny_lm


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return build_tiny_lm(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def llama_artifact(llama_dir, tmp_path_factory) -> artifact.Artifact:
    from stillroom.plugins.lm.export.onnx_artifact import export_causal_lm

    return export_causal_lm(llama_dir, tmp_path_factory.mktemp("out") / "llama-onnx")


def test_llama_artifact_is_validated_and_named_like_optimum(llama_artifact):
    m = llama_artifact.manifest
    assert m.kind == "causal-lm" and m.format == "onnx" and m.exporter == "dynamo" and m.precision == "fp32"
    assert m.variant == "kv-cache" and m.validation["chunked_prefill_checked"] == "all batch sizes"
    names = [i.name for i in m.inputs]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:] == [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    assert [o.name for o in m.outputs] == ["logits"] + [
        f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")
    ]
    past = m.inputs[3]
    assert past.shape == ["batch_size", 2, "past_sequence_length", 8]  # GQA: 2 KV heads of 4
    v = m.validation
    assert v["passed"] and v["max_abs_diff"] <= v["tolerance"]
    assert v["greedy_match_tokens"] == v["greedy_total_tokens"] == 4 * 32
    assert (llama_artifact.root / "tokenizer" / "tokenizer.json").is_file() and m.tokenizer == "tokenizer"
    assert m.provenance.source["type"] == "transformers" and "onnxruntime" in m.provenance.versions
    assert m.task == "text-generation" and m.family == "lm" and m.provenance.created


def test_prefill_with_empty_cache_matches_float64_reference(llama_artifact, llama_dir):
    """ORT prefill (past length 0) then one decode step vs the model run in float64."""
    import onnxruntime as ort
    from transformers import AutoModelForCausalLM

    ref_model = AutoModelForCausalLM.from_pretrained(llama_dir).double().eval()
    sess = ort.InferenceSession(str(llama_artifact.graph()), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    ids = rng.integers(0, ref_model.config.vocab_size, size=(2, 6)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    pos = np.clip(mask.cumsum(-1) - 1, 0, None)
    empty = np.zeros((2, 2, 0, 8), np.float32)
    feeds = {
        "input_ids": ids[:, :5],
        "attention_mask": mask[:, :5],
        "position_ids": pos[:, :5],
        **{f"past_key_values.{i}.{kv}": empty for i in range(2) for kv in ("key", "value")},
    }
    logits, *present = sess.run(None, feeds)
    assert present[0].shape == (2, 2, 5, 8)
    step = {
        "input_ids": ids[:, 5:],
        "attention_mask": mask,
        "position_ids": pos[:, 5:],
        **{
            f"past_key_values.{i}.{kv}": present[2 * i + j]
            for i in range(2)
            for j, kv in enumerate(("key", "value"))
        },
    }
    last, *_ = sess.run(None, step)
    with torch.no_grad():
        ref = ref_model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(pos),
            use_cache=False,
        ).logits.numpy()
    valid = mask[:, :5].astype(bool)
    np.testing.assert_allclose(logits[valid], ref[:, :5][valid], atol=1e-4)
    np.testing.assert_allclose(last[:, 0], ref[:, 5], atol=1e-4)


def test_validation_through_the_engine_fails_a_graph_that_computes_something_else(llama_artifact, llama_dir):
    """The checks can fail: the shipped graph against a model whose final norm was nudged by 1%."""
    from stillroom.core.ort_session import SessionOptions
    from stillroom.plugins.lm.engine import open_engine
    from stillroom.plugins.lm.export import validation
    from stillroom.plugins.lm.export.onnx_artifact import load_lm

    model, tokenizer = load_lm(llama_dir)
    lm = open_engine(llama_artifact.graph(), "kv-cache", SessionOptions.checks())
    assert validation.validate(model, lm, tokenizer)["passed"]
    with torch.no_grad():
        model.model.norm.weight.mul_(1.01)
    result = validation.validate(model, lm, tokenizer)
    assert not result["logits_ok"] and not result["passed"] and result["max_abs_diff"] > result["tolerance"]


def test_tampered_or_missing_file_is_refused(llama_artifact, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(llama_artifact.root, copy)
    artifact.load(copy)
    graph = copy / "model.onnx"
    data = bytearray(graph.read_bytes())
    data[-10] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(StillroomError, match="sha256"):
        artifact.load(copy)
    (copy / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(StillroomError, match="missing|sha256"):
        artifact.load(copy)


def _triton_model_config():
    """Triton's ModelConfig protobuf module as shipped in tritonclient (loaded without grpc)."""
    try:
        files = metadata.files("tritonclient") or []
    except metadata.PackageNotFoundError:
        pytest.skip("tritonclient is not installed (pip install tritonclient)")
    path = next(f.locate() for f in files if f.name == "model_config_pb2.py")
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_triton_repository_config_parses_with_tritons_schema(llama_artifact, tmp_path):
    import onnx
    from google.protobuf import text_format

    from stillroom.export.triton import write_repository

    mc = _triton_model_config()
    repo = write_repository(llama_artifact, tmp_path / "repo", name="tiny_lm", instances=2, max_batch_size=4)
    assert sorted(p.name for p in repo.root.iterdir()) == ["manifest.json", "tiny_lm", "tiny_lm_generate"]
    config = text_format.Parse((repo.root / "tiny_lm" / "config.pbtxt").read_text(), mc.ModelConfig())
    m = llama_artifact.manifest
    assert config.name == "tiny_lm" and config.platform == "onnxruntime_onnx" and config.max_batch_size == 4
    assert [i.name for i in config.input] == [i.name for i in m.inputs]
    assert [o.name for o in config.output] == [o.name for o in m.outputs]
    graph = onnx.load(str(repo.root / "tiny_lm" / "1" / "model.onnx"), load_external_data=False).graph
    for entries, values in ((config.input, graph.input), (config.output, graph.output)):
        for entry, value in zip(entries, values, strict=True):  # Triton's dims: the graph's after batch
            assert entry.name == value.name
            assert list(entry.dims) == [d.dim_value or -1 for d in value.type.tensor_type.shape.dim][1:]
    by_name = {i.name: i for i in config.input}
    assert by_name["input_ids"].data_type == mc.TYPE_INT64 and list(by_name["input_ids"].dims) == [-1]
    assert list(by_name["past_key_values.0.key"].dims) == [2, -1, 8]
    assert config.output[0].data_type == mc.TYPE_FP32 and list(config.output[0].dims) == [-1, 300]
    assert config.HasField("dynamic_batching") and config.instance_group[0].count == 2
    assert (repo.root / "tiny_lm" / "1" / "model.onnx").is_file() and repo.manifest.format == "triton"
    generate = text_format.Parse(
        (repo.root / "tiny_lm_generate" / "config.pbtxt").read_text(), mc.ModelConfig()
    )
    assert generate.backend == "python" and generate.max_batch_size == 0
    assert [(i.name, i.data_type, i.optional) for i in generate.input] == [
        ("text", mc.TYPE_STRING, False),
        ("max_tokens", mc.TYPE_INT32, True),
        ("temperature", mc.TYPE_FP32, True),
        ("seed", mc.TYPE_INT64, True),
    ]
    assert [(o.name, o.data_type, list(o.dims)) for o in generate.output] == [("text", mc.TYPE_STRING, [-1])]
    assert (
        generate.instance_group[0].count == 2
        and generate.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    )
    with pytest.raises(StillroomError, match="not a usable Triton model name"):
        write_repository(llama_artifact, tmp_path / "bad", name="../tiny_lm")


def test_source_detection_run_lm_and_errors(llama_dir, tmp_path):
    from stillroom.core.source import detect

    run = tmp_path / "run"
    shutil.copytree(llama_dir, run / "student")
    (run / "student" / "stillroom.json").write_text(json.dumps({"method": "kd", "sampler": None}))
    (run / "run.json").write_text(json.dumps({"method": "kd", "steps": 6, "student": "student"}))
    found = detect(run)
    assert found.kind == "causal-lm" and found.model_dir == run / "student"
    assert found.info["type"] == "run" and found.info["method"] == "kd" and found.info["steps"] == 6
    assert detect(llama_dir).info["type"] == "transformers"
    (tmp_path / "empty").mkdir()
    with pytest.raises(StillroomError, match="cannot tell"):
        detect(tmp_path / "empty")


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["int8", "fp16", "optimize"])
def test_llama_variants_pass_task_level_checks(llama_dir, tmp_path, variant):
    from stillroom.plugins.lm.export.onnx_artifact import export_causal_lm

    art = export_causal_lm(llama_dir, tmp_path / variant, **{variant: True})
    v = art.manifest.validation
    assert v["passed"] and "stages" in v and v["stages"]["fp32"]["passed"]
    if variant != "optimize":
        assert art.manifest.precision == variant
        assert v["perplexity_rel_delta"] <= v["thresholds"]["max_ppl_rel_increase"]


@pytest.mark.slow
def test_gpt2_export_validates(tmp_path):
    from stillroom.plugins.lm.export.onnx_artifact import export_causal_lm

    art = export_causal_lm(build_tiny_lm(tmp_path / "gpt2", "gpt2"), tmp_path / "out")
    assert art.manifest.validation["passed"] and art.manifest.inputs[3].shape[1] == 4  # MHA: 4 KV heads
