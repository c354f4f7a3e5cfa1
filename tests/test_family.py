"""The Family hooks bench and report use: quality columns, shared bench inputs, student-vs-teacher figures.

The built-in families are checked against hand computations; a fake family registered in a test host
shows that serve/ takes its columns, figures and sections from the family and the rows, not from a
table of known kinds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stillroom.core import host as hostmod
from stillroom.core.artifact import Manifest, Provenance, write_manifest
from stillroom.core.bench_plan import BenchSettings, Target
from stillroom.core.family import Family
from stillroom.core.hookspecs import hookimpl
from stillroom.core.host import get_host
from stillroom.plugins.diffusion.family import GeneratorFamily
from stillroom.plugins.lm.family import CausalLMFamily


# -- the base class -----------------------------------------------------------------------------------
def test_metric_and_quality_keys_complete_each_other():
    class OnlyMetric(Family):
        metric = "loss"

    class OnlyKeys(Family):
        quality_keys = ("error_rate", "coverage")

    assert OnlyMetric.quality_keys == ("loss",)
    assert OnlyKeys.metric == "error_rate"
    assert OnlyMetric().bench_inputs(None, None) == {} and OnlyMetric().compare({}, {}) == {}
    with pytest.raises(TypeError, match="start with its primary metric 'loss'"):

        class Disagrees(Family):  # noqa: F841 - defining it is the test
            metric = "loss"
            quality_keys = ("coverage", "loss")


def test_builtin_families_put_their_primary_metric_first():
    for family in (CausalLMFamily, GeneratorFamily):
        assert family.quality_keys[0] == family.metric
    assert GeneratorFamily().bench_inputs(None, None) == {}


# -- the causal-LM family -----------------------------------------------------------------------------
def _result(tmp_path, name, argmax, tokenizer="abc"):
    path = tmp_path / f"{name}.npy"
    np.save(path, np.asarray(argmax, dtype=np.int32))
    return {"tokenizer": tokenizer, "arrays": {"argmax": str(path)}}


def test_lm_compare_counts_matching_predictions(tmp_path):
    teacher = _result(tmp_path, "t", [[1, 2, 3], [4, 5, 6]])
    student = _result(tmp_path, "s", [[1, 0, 3], [4, 5, 0]])  # 4 of 6 positions agree
    assert CausalLMFamily().compare(teacher, student) == {"top1_agreement": pytest.approx(4 / 6)}


def test_lm_compare_needs_the_same_tokenizer_and_shape(tmp_path):
    teacher = _result(tmp_path, "t", [[1, 2, 3]])
    other_vocab = _result(tmp_path, "s", [[1, 2, 3]], tokenizer="xyz")
    assert CausalLMFamily().compare(teacher, other_vocab) == {}  # same ids, different tokens
    shorter = _result(tmp_path, "short", [[1, 2]])
    assert CausalLMFamily().compare(teacher, shorter) == {"top1_agreement": None}
    assert CausalLMFamily().compare(teacher, {"tokenizer": "abc"}) == {"top1_agreement": None}


def _artifact(tmp_path, kind, data=None):
    """An artifact whose provenance names the training ``data`` (the student folder is not kept)."""
    art = tmp_path / "artifact"
    art.mkdir(parents=True)
    write_manifest(art, Manifest(kind=kind, provenance=Provenance(data=data)))
    return art


def test_lm_bench_inputs_follow_the_students_training_data(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.txt").write_text("training text\n")
    (corpus / "valid.txt").write_text("held-out text\n")
    art = _artifact(tmp_path, "causal-lm", str(corpus))
    inputs = CausalLMFamily().bench_inputs(art, tmp_path / "work")
    assert inputs == {"heldout": str(tmp_path / "work" / "heldout.txt")}
    assert (tmp_path / "work" / "heldout.txt").read_text() == "held-out text\n"

    (corpus / "valid.txt").unlink()  # no held-out split: score on the train split rather than nothing
    CausalLMFamily().bench_inputs(art, tmp_path / "work")
    assert (tmp_path / "work" / "heldout.txt").read_text() == "training text\n"


def test_lm_bench_inputs_default_to_the_embedded_corpus(tmp_path, caplog):
    from stillroom.data import root

    embedded = (root() / "shakespeare" / "valid.txt").read_text()
    CausalLMFamily().bench_inputs(None, tmp_path)
    assert (tmp_path / "heldout.txt").read_text() == embedded
    gone = _artifact(tmp_path / "moved", "causal-lm", str(tmp_path / "deleted-corpus"))
    CausalLMFamily().bench_inputs(gone, tmp_path)  # data no longer at hand: say so, score anyway
    assert (tmp_path / "heldout.txt").read_text() == embedded
    assert "deleted-corpus' does not exist" in caplog.text


def test_bench_inputs_follow_the_artifacts_family(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "valid.txt").write_text("held-out text\n")
    lm = _artifact(tmp_path / "lm", "causal-lm", str(corpus))
    family = get_host().family_of_kind("causal-lm")
    inputs = family.bench_inputs(lm, tmp_path / "lm-work")
    assert Path(inputs["heldout"]).read_text() == "held-out text\n"
    generator = _artifact(tmp_path / "gen", "generator")
    assert get_host().family_of_kind("generator").bench_inputs(generator, tmp_path / "gen-work") == {}


# -- a family serve/ has never heard of ---------------------------------------------------------------
class ToyFamily(Family):
    name = "toy"
    kind = "toy-kind"
    quality_keys = ("error_rate", "gap_to_teacher")

    def compare(self, teacher, student):
        return {"gap_to_teacher": student["quality"]["error_rate"] - teacher["quality"]["error_rate"]}


class ToyPlugin:
    @hookimpl
    def register_families(self, register):
        register(ToyFamily)


@pytest.fixture()
def toy_host(monkeypatch):
    host = hostmod.Host()
    host.register(ToyPlugin(), "toy")
    monkeypatch.setattr(hostmod, "_HOST", host)
    return host


def _toy_result(error_rate, p50_s, **extra):
    timing = [
        {
            "batch": b,
            "latency_ms": {
                "p50": p50_s * b,
                "p90": p50_s * b * 1.5,
                "p99": p50_s * b * 2,
                "mean": 1,
                "min": 0.5,
            },
            "throughput": 1.0 / p50_s,
            "throughput_unit": "things/s",
        }
        for b in (1, 2)
    ]
    common = {"load_s": 0.1, "peak_rss_mb": 100.0, "gpu_peak_mb": None, "provider": "cpu", "device": "cpu"}
    return {"kind": "toy-kind", "timing": timing, "quality": {"error_rate": error_rate}, **common, **extra}


def test_report_takes_columns_and_figures_from_the_family(toy_host, tmp_path):
    from stillroom.serve.bench import assemble
    from stillroom.serve.report import write_report

    settings = BenchSettings(batches=[1, 2])
    results = [
        (Target("teacher", "torch", "t", role="teacher"), _toy_result(0.10, 40.0)),
        (Target("small", "onnxruntime", "s"), _toy_result(0.25, 10.0, notes="kept on the rows")),
        (Target("broken", "onnxruntime", "b"), {"error": "could not load"}),
    ]
    report = assemble("toy-kind", results, settings)
    small = [r for r in report["students"] if r["name"] == "small"]
    assert [r["quality"]["gap_to_teacher"] for r in small] == [pytest.approx(0.15)] * 2
    assert [r["speedup_p50"] for r in small] == [pytest.approx(4.0)] * 2 and report["speedup_p50"] == 4.0
    assert small[0]["notes"] == "kept on the rows" and "kind" not in small[0]

    paths = write_report(report, tmp_path)
    md = paths["md"].read_text()
    head = next(line for line in md.splitlines() if line.startswith("| model"))
    assert head.endswith("| peak RSS MB | error_rate | gap_to_teacher | speedup p50 |")
    assert "TTFT" not in head  # no row carries time-to-first-token
    assert "| small | onnxruntime | 1 | 10 |" in md and "0.15" in md and "error: could not load" in md
    assert "Continuations" not in md and "Samples" not in md  # no row carries either
    html = paths["html"].read_text()
    assert html.count("data:image/png;base64,") == 2  # latency, and error_rate against latency
    assert json.loads(paths["json"].read_text())["kind"] == "toy-kind"


def test_report_sections_follow_the_rows(toy_host, tmp_path):
    from stillroom.serve.bench import assemble
    from stillroom.serve.report import markdown

    grid = tmp_path / "grid.npy"
    np.save(grid, np.zeros((2, 1, 4, 4), dtype=np.float32))
    said = [{"prompt": "Hi", "text": " there"}]
    results = [(Target("small", "onnxruntime", "s"), _toy_result(0.2, 5.0, continuations=said))]
    md = markdown(assemble("toy-kind", results, BenchSettings(batches=[1, 2])))
    assert "## Continuations (greedy)" in md and "`Hi` -> ' there'" in md and "## Samples" not in md

    from stillroom.serve.report import write_report

    results = [(Target("small", "onnxruntime", "s"), _toy_result(0.2, 5.0, arrays={"grid": str(grid)}))]
    report = assemble("toy-kind", results, BenchSettings(batches=[1, 2]))
    write_report(report, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Samples" in md and "Continuations" not in md
    assert all(
        r["samples"] == "samples/small-onnxruntime.png" and "arrays" not in r for r in report["students"]
    )
    assert (tmp_path / "out" / "samples" / "small-onnxruntime.png").read_bytes()[:4] == b"\x89PNG"


def test_format_value():
    from stillroom.serve.report import format_value

    assert format_value(None) == "-" and format_value(7) == "7" and format_value("x") == "x"
    assert format_value(3.14159) == "3.14" and format_value(3.14159, 4) == "3.142"
    assert format_value(123456.7) == "123457"


# -- quality comes from the registered metrics ----------------------------------------------------------
class ToyModel:
    kind, provider, device = "toy-kind", "cpu", "cpu"


class MeasuredToyFamily(ToyFamily):
    def claims(self, path):
        return True

    def bench(self, model, job, settings, out):
        return {"timing": [{"batch": b} for b in settings.batches]}


class MeasuredToyPlugin:
    @hookimpl
    def register_families(self, register):
        register(MeasuredToyFamily)

    @hookimpl
    def register_runtimes(self, register):
        register("toy-runtime", lambda spec, name=None, **options: ToyModel())

    @hookimpl
    def register_metrics(self, register):
        def error_rate(model, job, settings, out):
            assert isinstance(model, ToyModel) and job["target"]["spec"] == "anything"
            return {"quality": {"error_rate": 0.25}, "notes": "set by the metric"}

        register("error_rate", error_rate)
        register("extra", lambda model, job, settings, out: {"quality": {"extra": 1.0}})


def _run_worker(tmp_path, metrics):
    from stillroom.serve.bench_worker import run_job

    job = tmp_path / "job.json"
    target = Target("small", "toy-runtime", "anything")
    job.write_text(
        json.dumps({"target": target.__dict__, "settings": BenchSettings(metrics=metrics).as_json()})
    )
    run_job(job)
    return json.loads((tmp_path / "result.json").read_text())


def test_bench_worker_runs_the_family_metric_or_the_ones_asked_for(monkeypatch, tmp_path):
    host = hostmod.Host()
    host.register(MeasuredToyPlugin(), "measured-toy")
    monkeypatch.setattr(hostmod, "_HOST", host)

    default = _run_worker(tmp_path, [])
    assert default["quality"] == {"error_rate": 0.25} and default["notes"] == "set by the metric"
    assert [row["batch"] for row in default["timing"]] == [1, 8]
    both = _run_worker(tmp_path, ["error_rate", "extra"])
    assert both["quality"] == {"error_rate": 0.25, "extra": 1.0}
    unknown = _run_worker(tmp_path, ["nope"])
    assert unknown == {"error": unknown["error"]} and "unknown metric 'nope'" in unknown["error"]
