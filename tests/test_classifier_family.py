"""The classifier family end to end: a tiny LELP run of the shipped recipe (a small random teacher built
from config, the embedded MNIST) through ``stillroom.train``, ``export_model`` and ``bench``; what the
artifact says; runtimes that agree; the registry, the recipes and the one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import stillroom
from stillroom.core import recipe as recipes
from stillroom.core.errors import StillroomError
from stillroom.core.host import get_host
from stillroom.plugins.classifier import data, metrics
from stillroom.plugins.classifier.models import ClassifierConfig, ConvClassifier, save_classifier
from stillroom.plugins.classifier.runtime import load

TINY = [
    "train.steps=30",
    "train.batch_size=32",
    "train.warmup_steps=0",
    "train.eval_every=0",
    "train.tensorboard=false",
    "train.device=cpu",
    "student.channels=[4, 8]",
    "student.feature_dim=16",
]


def tiny_teacher(out):
    torch.manual_seed(0)
    save_classifier(ConvClassifier(ClassifierConfig(channels=[8, 8], convs_per_stage=1, feature_dim=24)), out)
    return out


@pytest.fixture(scope="module")
def lelp(tmp_path_factory):
    """A finished tiny LELP run, its artifact and its benchmark report."""
    root = tmp_path_factory.mktemp("lelp")
    teacher = tiny_teacher(root / "teacher")
    student = stillroom.train("mnist-lelp", root / "run", [f"teacher.path={teacher}", *TINY])
    art = stillroom.export_model(root / "run", root / "artifact")
    report = stillroom.bench(
        art.root, root / "bench", batches=(1, 4), warmup=1, repeats=2, quality_samples=200
    )
    return {"teacher": teacher, "run": root / "run", "student": student, "artifact": art, "report": report}


def test_lelp_trains_a_subclass_head_and_its_loss_falls(lelp):
    config = json.loads((lelp["student"] / "config.json").read_text())
    assert config["subclasses"] == 4 and config["channels"] == [4, 8]  # 2 directions, both sides
    rows = [json.loads(line) for line in (lelp["run"] / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss/student"] for r in rows if "loss/student" in r]
    assert len(losses) == 30 and np.mean(losses[-5:]) < np.mean(losses[:5])
    final = rows[-1]
    assert 0 <= final["eval/accuracy"] <= 1 and 0 <= final["eval/ece"] <= 1


def test_artifact_manifest_is_typed_and_validated(lelp):
    m = lelp["artifact"].manifest
    assert (m.kind, m.family, m.task, m.precision) == (
        "image-classifier",
        "classifier",
        "image-classification",
        "fp32",
    )
    assert [(t.name, t.shape) for t in m.inputs] == [("image", ["batch_size", 1, 28, 28])]
    assert [(t.name, t.shape) for t in m.outputs] == [("logits", ["batch_size", 10])]
    assert m.spec["subclasses"] == 4 and m.spec["class_names"] == [str(c) for c in range(10)]
    assert m.spec["mean"] == [0.5] and m.spec["std"] == [0.5]
    v = m.validation
    assert v["passed"] and v["max_abs_diff"] <= v["tolerance"] and v["top1_agreement"] >= 0.999
    assert v["images"] == 1000  # the whole held-out split
    assert m.provenance.method == "lelp" and m.provenance.data == "embedded:mnist"


def test_runtimes_agree_and_bench_scores_the_same_images(lelp):
    pixels, labels = data.load_split("embedded:mnist", "eval")
    pixels, labels = pixels[:200], labels[:200]
    torch_model = load("torch", str(lelp["student"]))
    ort_model = load("onnxruntime", str(lelp["artifact"].root))
    a, b = torch_model.logits(pixels), ort_model.logits(pixels)
    np.testing.assert_allclose(a, b, atol=1e-4)

    report = lelp["report"]
    assert report["kind"] == "image-classifier"
    teacher, (student_row, _) = report["teacher"], report["students"]
    assert teacher["runtime"] == "torch" and student_row["runtime"] == "onnxruntime"
    assert student_row["quality"]["samples"] == 200
    assert student_row["quality"]["accuracy"] == pytest.approx(metrics.accuracy(a, labels))
    assert student_row["quality"]["ece"] == pytest.approx(
        metrics.expected_calibration_error(metrics.softmax(a), labels), abs=1e-6
    )
    t = load("torch", str(lelp["teacher"])).logits(pixels)
    assert teacher["quality"]["accuracy"] == pytest.approx(metrics.accuracy(t, labels))
    assert student_row["quality"]["top1_agreement"] == pytest.approx(
        metrics.top1_agreement(a.argmax(1), t.argmax(1))
    )
    table = (lelp["run"].parent / "bench" / "report.md").read_text()
    assert "| accuracy | ece | top1_agreement |" in table


def test_torch_runtime_refuses_the_artifact(lelp):
    with pytest.raises(StillroomError, match="is an exported artifact"):
        load("torch", str(lelp["artifact"].root))


@pytest.mark.gpu
def test_tensorrt_engine_agrees_with_onnxruntime(lelp, tmp_path, monkeypatch):
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    monkeypatch.setenv("STILLROOM_CACHE", str(tmp_path / "cache"))
    engine = stillroom.export_model(lelp["artifact"].root, tmp_path / "trt", to="tensorrt")
    pixels, _ = data.load_split("embedded:mnist", "eval")
    want = load("onnxruntime", str(lelp["artifact"].root)).logits(pixels[:16])
    got = load("tensorrt", str(engine.root)).logits(pixels[:16])
    np.testing.assert_allclose(got, want, atol=1e-3)


def test_registry_names_and_shipped_recipes():
    host = get_host()
    assert host.method("classifier_kd").family == host.method("lelp").family == "classifier"
    assert host.method("kd").family == "lm"  # classifier KD does not take the LM family's name
    assert host.family_of_kind("image-classifier").metric == "accuracy" and host.metric("accuracy")
    kd, lelp = recipes.load("mnist-classifier-kd"), recipes.load("mnist-lelp")
    assert (kd.method_name, lelp.method_name) == ("classifier_kd", "lelp")
    assert kd.student == lelp.student and kd.train == lelp.train  # the benchmark compares like with like


def test_user_errors_are_one_line(tmp_path):
    teacher = tiny_teacher(tmp_path / "teacher")
    cases = {
        "data.source=/no/such.npz": "classifier data source '/no/such.npz' is not an .npz file",
        f"teacher.path={tmp_path}": f"teacher '{tmp_path}' is not a classifier directory",
        "method.directions=20": "lelp: 20 directions per class, but the teacher's embedding leaves only 14",
    }
    for override, message in cases.items():
        with pytest.raises(StillroomError) as err:
            stillroom.train("mnist-lelp", tmp_path / "run", [f"teacher.path={teacher}", *TINY, override])
        assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(StillroomError, match="classifier artifacts are fp32 only"):
        stillroom.export_model(teacher, tmp_path / "art", fp16=True)
