"""The student-vs-teacher benchmark: every target through one harness, each in a fresh process.

``benchmark(targets, settings, out)`` is the library entry point (the CLI and the demo's combined
report both call it). The targets' family (``core.family.Family``) prepares what every target shares
(``bench_inputs``, e.g. held-out data) and measures each target in ``bench_worker``; the results are
joined into one report dict with the family's student-vs-teacher figures (``compare``) and the p50
speedup of each student over the teacher at the same batch size, and written as report.json /
report.md / report.html.
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

from stillroom.core import artifact as artifacts
from stillroom.core.bench_plan import BenchSettings, Target
from stillroom.core.errors import StillroomError
from stillroom.core.family import Family
from stillroom.core.fsio import write_json
from stillroom.core.host import get_host
from stillroom.data import locate, resolve

log = logging.getLogger(__name__)
RESERVED = ("target", "settings")  # job keys that bench_inputs may not take


# -- what to compare ----------------------------------------------------------------------------------
def default_teacher(artifact_dir: str | Path) -> Target | None:
    """The teacher to compare the artifact's student with, in torch: the copy inside the artifact
    (``export --with-teacher``), else the teacher its recipe named (``provenance.teacher``) when that
    is still reachable (``embedded:NAME``, a hub id, a path that exists). Only the artifact is read."""
    manifest = artifacts.read_manifest(Path(artifact_dir))
    if manifest.teacher:
        spec = str(artifacts.safe_join(Path(artifact_dir), manifest.teacher))
    elif manifest.provenance.teacher:
        try:
            spec = locate(manifest.provenance.teacher, "teacher")
        except StillroomError as err:
            log.warning("%s; benchmarking the student alone (pass --teacher, or export --with-teacher)", err)
            return None
    else:
        return None
    return Target(name="teacher", runtime="torch", spec=spec, role="teacher")


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
def _family_of(targets: list[Target]) -> tuple[Family, Path | None]:
    """The one family of every target, and the first student artifact (what ``bench_inputs`` follows).

    A target no family claims is left to its own process, which reports the error in its row.
    """
    host = get_host()
    found: dict[str, Family] = {}
    errors: list[str] = []
    student_artifact = None
    for target in targets:
        try:
            family = host.family_for_target(target.spec)
            path = Path(resolve(target.spec))
        except StillroomError as err:
            errors.append(f"{target.label}: {err}")
            continue
        found.setdefault(family.kind, family)
        if target.role == "student" and student_artifact is None and (path / artifacts.MANIFEST).is_file():
            student_artifact = path
    if len(found) > 1:
        raise StillroomError(
            f"the benchmark mixes model kinds {sorted(found)}", "benchmark models of one kind together"
        )
    if not found:
        raise StillroomError(
            f"no target could be measured ({'; '.join(errors)})", "fix the first error above"
        )
    return found.popitem()[1], student_artifact


def _run_target(
    target: Target, settings: BenchSettings, workdir: Path, inputs: dict[str, Any]
) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    for stale in [workdir / "result.json", *workdir.glob("*.npy")]:
        stale.unlink(missing_ok=True)  # a rerun into the same ``out`` must never read the last run's outputs
    job = workdir / "job.json"
    write_json(job, {**inputs, "target": target.__dict__, "settings": settings.as_json()})
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
    result["arrays"] = {path.stem: str(path) for path in sorted(workdir.glob("*.npy"))}
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


COMMON = ("load_s", "peak_rss_mb", "gpu_peak_mb", "provider", "device")
NOT_ON_ROWS = ("kind", "timing", "quality", *COMMON)


def _entries(target: Target, result: dict[str, Any], figures: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per batch size: the timing row, the shared figures, ``quality`` (+ ``figures`` from
    ``Family.compare``) and whatever else the family's ``bench`` returned (e.g. continuations)."""
    base = {
        "name": target.name,
        "runtime": target.runtime,
        "spec": target.spec,
        "role": target.role,
        "options": target.options,
    }
    if "error" in result:
        return [{**base, "error": result["error"]}]
    common = {k: result.get(k) for k in COMMON}
    extras = {k: v for k, v in result.items() if k not in NOT_ON_ROWS}
    return [
        {**base, **timing, **common, "quality": {**(result.get("quality") or {}), **figures}, **extras}
        for timing in result["timing"]
    ]


def assemble(
    kind: str, results: list[tuple[Target, dict[str, Any]]], settings: BenchSettings
) -> dict[str, Any]:
    """Joins per-target results into the report dict (schema in the module docstring of report.py)."""
    family = get_host().family_of_kind(kind)
    teacher_result = next((r for t, r in results if t.role == "teacher" and "error" not in r), None)
    teacher_rows: list[dict[str, Any]] = []
    students: list[dict[str, Any]] = []
    for target, result in results:
        if target.role == "teacher":
            teacher_rows.extend(_entries(target, result, {}))
            continue
        paired = teacher_result is not None and "error" not in result
        students.extend(_entries(target, result, family.compare(teacher_result, result) if paired else {}))
    by_batch = {r["batch"]: r for r in teacher_rows if "error" not in r}
    for row in students:
        if "error" in row:
            continue
        t = by_batch.get(row["batch"])
        row["speedup_p50"] = t["latency_ms"]["p50"] / row["latency_ms"]["p50"] if t else None
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
    write: bool = True,
) -> dict[str, Any]:
    """Measures every target in its own process and writes the report files into ``out``.

    The family's ``bench_inputs`` follow the first student artifact among the targets.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    family, student_artifact = _family_of(targets)
    inputs = family.bench_inputs(student_artifact, out / "work")
    if taken := set(RESERVED) & set(inputs):
        raise StillroomError(
            f"family '{family.name}' returned bench inputs named {sorted(taken)}, which the job uses",
            "rename them in the family's bench_inputs",
        )
    results = [
        (target, _run_target(target, settings, out / "work" / f"{i:02d}-{target.role}", inputs))
        for i, target in enumerate(targets)
    ]
    if all("error" in r for _, r in results):
        errors = "; ".join(f"{t.label}: {r['error']}" for t, r in results)
        raise StillroomError(f"no target could be measured ({errors})", "fix the first error above")
    report = assemble(family.kind, results, settings)
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
    output = get_host().output_family(artifact_dir)
    if output is not None:  # not a model: the family measures its output folder itself
        return output.bench_output(Path(artifact_dir), Path(out), settings)
    artifacts.load(artifact_dir)  # a damaged artifact fails here, not after minutes of teacher timing
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
    return benchmark(targets, settings, out)
