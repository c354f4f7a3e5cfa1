"""`stillroom demo --fast` end to end: every stage's output, the report schema, stage reuse.

--fast distills a 1-step and a 2-step generator (the full demo: 1 and 4) so the unrolled exports stay short.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from stillroom.core import artifact
from tests.conftest import STILLROOM, cli_env


def run_demo(out, timeout: int) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [STILLROOM, "demo", "--fast", "--out", str(out)],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, timeout=1200)


def test_every_stage_leaves_its_result(demo_out):
    out, _ = demo_out
    for run in ("mnist-1step", "mnist-1step-dmd2", "mnist-2step", "shakespeare-lm"):
        assert (out / "runs" / run / "run.json").is_file()
        assert (out / "runs" / run / "student" / "stillroom.json").is_file()
    kinds = {}
    for name in ("mnist-1step", "mnist-2step", "shakespeare-lm", "shakespeare-lm-int8"):
        art = artifact.load(out / "artifacts" / name)  # verifies every sha256
        assert art.manifest.validation["passed"] is True
        kinds[name] = (art.kind, art.manifest.precision)
    assert kinds["mnist-2step"] == ("generator", "fp32")
    assert kinds["shakespeare-lm-int8"] == ("causal-lm", "int8")
    one_step = artifact.load(out / "artifacts" / "mnist-1step").manifest
    assert one_step.spec["steps"] == 1
    assert one_step.provenance.method == "dmd2"  # the DMD2 finish of the progressive student is shipped
    assert artifact.load(out / "artifacts" / "mnist-2step").manifest.spec["steps"] == 2


def test_report_schema_and_summary(demo_out):
    out, proc = demo_out
    report = json.loads((out / "report.json").read_text())
    assert set(report) >= {"summary", "reports", "timings_s", "fast"} and report["fast"] is True
    assert set(report["reports"]) == {"generator", "causal-lm"}
    for kind, sub in report["reports"].items():
        assert sub["kind"] == kind and sub["teacher"] is not None
        for row in sub["students"]:
            assert "error" not in row, row
            assert row["latency_ms"]["p50"] > 0 and row["speedup_p50"] > 0
    gen = report["reports"]["generator"]["students"][0]["quality"]
    assert {"fid_like", "class_accuracy"} <= set(gen)
    lm = report["reports"]["causal-lm"]["students"][0]["quality"]
    assert lm["perplexity"] > 1 and 0 <= lm["top1_agreement"] <= 1
    students = {r["student"] for r in report["summary"]}
    assert students == {"mnist-1step", "mnist-2step", "shakespeare-lm", "shakespeare-lm-int8"}
    assert all(r["speedup"] and r["quality_ratio"] for r in report["summary"])
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 4  # latency + quality plots per kind, sample grids
    assert "Continuations" in page and "Samples" in page
    assert "quality ratio" in (out / "report.md").read_text()
    assert "report.html" in proc.stdout and "speedup" in proc.stdout


def test_rerun_reuses_finished_stages(demo_out):
    out, _ = demo_out
    before = {p: p.stat().st_mtime_ns for p in (out / "artifacts").rglob("manifest.json")}
    start = time.perf_counter()
    proc = run_demo(out, timeout=600)
    assert proc.stderr.count("[skip]") >= 9  # 3 runs, 4 artifacts, 2 benches
    assert {p: p.stat().st_mtime_ns for p in (out / "artifacts").rglob("manifest.json")} == before
    assert time.perf_counter() - start < 120
