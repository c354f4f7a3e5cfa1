"""The student-vs-teacher benchmark: every target through one harness, each in a fresh process.

``benchmark(targets, settings, out)`` is the library entry point (the CLI and the demo's combined
report both call it): it runs ``bench_worker`` once per target, then joins the results into one
report dict, adds top-1 agreement with the teacher (argmax predictions compared position by position
on the same held-out tokens, when the tokenizers are identical) and the p50 speedup of each student
over the teacher at the same batch size, and writes report.json / report.md / report.html.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from stillroom.core import artifact as artifacts
from stillroom.core.bench_plan import BenchSettings, Target
from stillroom.core.errors import StillroomError
from stillroom.core.fsio import write_json, write_text

log = logging.getLogger(__name__)
DEFAULT_DATA = "embedded:shakespeare"


# -- what to compare ----------------------------------------------------------------------------------
def _student_card(art: artifacts.Artifact) -> dict[str, Any]:
    source = art.manifest.source
    candidates = [source.get(k) for k in ("model_dir", "student_dir", "path")]
    candidates += [str(Path(source[k]) / "student") for k in ("run_dir", "run") if source.get(k)]
    for where in filter(None, candidates):
        card = Path(where) / "stillroom.json"
        if card.is_file():
            return json.loads(card.read_text())
    return {}


def default_teacher(artifact_dir: str | Path) -> Target | None:
    """The teacher the artifact's student was distilled from (its recipe's ``teacher.path``), in torch."""
    art = artifacts.load(artifact_dir, verify=False)
    recipe = _student_card(art).get("recipe") or {}
    spec = (recipe.get("teacher") or {}).get("path")
    if not spec:
        return None
    return Target(name="teacher", runtime="torch", spec=str(spec), role="teacher")


def heldout_text(artifact_dir: str | Path | None) -> str:
    """The held-out split of the student's training data (the recipe's data.source), else Shakespeare."""
    from stillroom.plugins.lm import data as textdata

    source = DEFAULT_DATA
    if artifact_dir is not None:
        recipe = _student_card(artifacts.load(artifact_dir, verify=False)).get("recipe") or {}
        source = (recipe.get("data") or {}).get("source") or DEFAULT_DATA
    files = textdata.split_files(source, "valid") or textdata.split_files(source, "train")
    return "\n".join(r.text for r in textdata.read_records(files))


def parse_batches(text: str) -> list[int]:
    try:
        batches = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise StillroomError(
            f"--batch '{text}' is not a comma-separated list of integers", "e.g. --batch 1,8"
        ) from None
    if not batches or any(b < 1 for b in batches):
        raise StillroomError(f"--batch '{text}' needs positive sizes", "e.g. --batch 1,8")
    return batches


# -- running ------------------------------------------------------------------------------------------
def _run_target(target: Target, settings: BenchSettings, workdir: Path, heldout: Path) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    job = workdir / "job.json"
    write_json(job, {"target": target.__dict__, "settings": settings.as_json(), "heldout": str(heldout)})
    log.info("benchmarking %s in a fresh process", target.label)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "stillroom.serve.bench_worker", str(job)],
            env=env,
            capture_output=True,
            text=True,
            timeout=settings.timeout_s,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {settings.timeout_s} s"}
    result_path = workdir / "result.json"
    if not result_path.is_file():
        tail = " ".join(proc.stderr.strip().splitlines()[-3:])[-400:]
        return {"error": f"the benchmark process failed (exit {proc.returncode}): {tail}"}
    result = json.loads(result_path.read_text())
    for name in ("argmax.npy", "grid.npy"):
        if (workdir / name).is_file():
            result[name.split(".")[0]] = str(workdir / name)
    return result


def machine_info() -> dict[str, Any]:
    import onnxruntime
    import psutil
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": gpu,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers": onnxruntime.get_available_providers(),
    }


def _entries(target: Target, result: dict[str, Any]) -> list[dict[str, Any]]:
    base = {
        "name": target.name,
        "runtime": target.runtime,
        "spec": target.spec,
        "role": target.role,
        "options": target.options,
    }
    if "error" in result:
        return [{**base, "error": result["error"]}]
    common = {k: result.get(k) for k in ("load_s", "peak_rss_mb", "gpu_peak_mb", "provider", "device")}
    quality = dict(result.get("quality") or {})
    extras = {k: result[k] for k in ("continuations", "grid", "argmax", "tokenizer") if k in result}
    return [{**base, **timing, **common, "quality": quality, **extras} for timing in result["timing"]]


def _agreement(teacher_argmax: str | None, student_argmax: str | None) -> float | None:
    if not teacher_argmax or not student_argmax:
        return None
    a, b = np.load(teacher_argmax), np.load(student_argmax)
    return float((a == b).mean()) if a.shape == b.shape else None


def assemble(
    kind: str, results: list[tuple[Target, dict[str, Any]]], settings: BenchSettings
) -> dict[str, Any]:
    """Joins per-target results into the report dict (schema in the module docstring of report.py)."""
    teacher_rows: list[dict[str, Any]] = []
    students: list[dict[str, Any]] = []
    for target, result in results:
        rows = _entries(target, result)
        (teacher_rows if target.role == "teacher" else students).extend(rows)
    teacher_ok = [r for r in teacher_rows if "error" not in r]
    by_batch = {r["batch"]: r for r in teacher_ok}
    for row in students:
        if "error" in row:
            continue
        t = by_batch.get(row["batch"])
        row["speedup_p50"] = t["latency_ms"]["p50"] / row["latency_ms"]["p50"] if t else None
        if kind == "causal-lm" and teacher_ok and row.get("tokenizer") == teacher_ok[0].get("tokenizer"):
            row["quality"]["top1_agreement"] = _agreement(teacher_ok[0].get("argmax"), row.get("argmax"))
    teacher = None
    if teacher_rows:
        first = teacher_rows[0]
        teacher = {**first, "by_batch": teacher_rows}
    speedups = [
        r["speedup_p50"] for r in students if r.get("speedup_p50") and r["batch"] == min(settings.batches)
    ]
    return {
        "format_version": 1,
        "kind": kind,
        "machine": machine_info(),
        "settings": settings.as_json(),
        "teacher": teacher,
        "students": students,
        "speedup_p50": max(speedups) if speedups else None,
    }


def benchmark(
    targets: list[Target],
    settings: BenchSettings,
    out: str | Path,
    heldout: str | None = None,
    write: bool = True,
) -> dict[str, Any]:
    """Measures every target in its own process and writes the report files into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    heldout_path = out / "work" / "heldout.txt"
    write_text(heldout_path, heldout if heldout is not None else heldout_text(None))
    results = []
    for i, target in enumerate(targets):
        results.append(
            (target, _run_target(target, settings, out / "work" / f"{i:02d}-{target.role}", heldout_path))
        )
    kinds = {r.get("kind") for _, r in results if "kind" in r}
    if len(kinds) > 1:
        raise StillroomError(
            f"the benchmark mixes model kinds {sorted(kinds)}",
            "compare LMs with LMs and generators with generators",
        )
    if not kinds:
        errors = "; ".join(f"{t.label}: {r['error']}" for t, r in results)
        raise StillroomError(f"no target could be measured ({errors})", "fix the first error above")
    report = assemble(kinds.pop(), results, settings)
    if write:
        from stillroom.serve.report import write_report

        write_report(report, out)
    return report


def run_bench(
    artifact_dir: str | Path,
    out: str | Path,
    teacher: str | None = None,
    runtimes: list[str] | None = None,
    settings: BenchSettings | None = None,
    options: dict[str, dict[str, Any]] | None = None,
    teacher_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`stillroom bench`: one artifact on each runtime against its teacher (or ``teacher`` spec)."""
    settings = settings or BenchSettings()
    art = artifacts.load(artifact_dir)
    name = Path(artifact_dir).resolve().name
    targets = [
        Target(name=name, runtime=rt, spec=str(artifact_dir), options=(options or {}).get(rt, {}))
        for rt in (runtimes or ["onnxruntime"])
    ]
    t = (
        Target(name="teacher", runtime="torch", spec=teacher, role="teacher")
        if teacher
        else default_teacher(artifact_dir)
    )
    if t is None:
        log.warning("the artifact does not name its teacher; benchmarking the student alone (use --teacher)")
    else:
        t.options = dict(teacher_options or {})
        targets.insert(0, t)
    heldout = heldout_text(artifact_dir) if art.kind == "causal-lm" else ""
    return benchmark(targets, settings, out, heldout=heldout)
