"""`stillroom demo`: the whole mission on the embedded defaults, in one command.

1. distills the embedded MNIST teacher into a 1-step and a 4-step generator (progressive distillation;
   the 1-step student then gets a short DMD2 finish, which brings it to the teacher's FID-like);
2. distills the embedded Shakespeare LM teacher into a 2-layer student;
3. exports every student to a validated ONNX artifact (plus an int8 variant of the LM);
4. benchmarks each against its teacher with the `stillroom bench` machinery (each in a fresh process);
5. writes one self-contained report.html (plus report.md and report.json) to ``--out``;
6. prints a summary table (speedup and quality ratio per student) and the report path.

Every stage writes its result atomically and is skipped on a re-run when its result is present and
valid (a run with run.json, an artifact whose manifest and sha256s verify, a bench report), so an
interrupted demo continues where it stopped. ``--fast`` shrinks every stage (a ~2-minute smoke run
used by the tests); its numbers are not meaningful.
"""

from __future__ import annotations

import html
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stillroom import pipeline
from stillroom.core.fsio import write_json, write_text
from stillroom.core.host import get_host
from stillroom.serve import report as rep
from stillroom.serve.report import format_value

log = logging.getLogger(__name__)

# Chosen by benchmarks/diffusion_steps.py and benchmarks/lm_kd.py (numbers in the README).
GENERATOR_RECIPE = "mnist-progressive"
FINISH_RECIPE = "mnist-dmd2"  # fine-tunes a progressive student (its student.init)
LM_RECIPE = "lm-kd"


@dataclass
class Plan:
    """Sizes of every stage: the full demo, or the --fast smoke variant."""

    generator_steps: tuple[int, ...] = (1, 4)
    generator_overrides: dict[int, list[str]] = field(default_factory=dict)  # per student step count
    # student step count -> overrides of a FINISH_RECIPE stage started from that progressive student
    finish_overrides: dict[int, list[str]] = field(default_factory=dict)
    lm_overrides: list[str] = field(default_factory=list)
    lm_batches: list[int] = field(default_factory=lambda: [1, 8])
    generator_batches: list[int] = field(default_factory=lambda: [1, 16])
    repeats: int = 10
    quality_samples: int = 200
    eval_blocks: int = 32


FULL = Plan(
    generator_overrides={1: ["student.steps=1"], 4: ["student.steps=4"]},
    finish_overrides={1: ["train.steps=150"]},
    lm_overrides=["train.steps=200", "train.batch_size=8", "train.eval_every=0"],
    quality_samples=100,
)
FAST = Plan(
    generator_steps=(1, 2),
    generator_overrides={
        1: ["student.steps=1", "train.steps=3", "train.batch_size=4"],
        2: ["student.steps=2", "train.steps=2", "train.batch_size=4"],
    },
    finish_overrides={1: ["train.steps=2", "train.batch_size=4"]},
    lm_overrides=[
        "train.steps=3",
        "train.batch_size=2",
        "train.eval_every=0",
        "data.max_train_tokens=20000",
        "data.eval_tokens=512",
    ],
    lm_batches=[1],
    generator_batches=[2],
    repeats=2,
    quality_samples=50,
    eval_blocks=4,
)


class Demo:
    def __init__(self, out: Path, fast: bool = False) -> None:
        self.out = Path(out)
        self.fast = fast
        self.plan = FAST if fast else FULL
        self.timings: dict[str, float] = {}

    # -- stages (stillroom.pipeline's: each skipped when its result is present and valid) ------------
    def distill(self, name: str, recipe: str, overrides: list[str]) -> Path:
        """Trains into runs/NAME (resuming a run that stopped) unless that run finished."""
        run = self.out / "runs" / name
        rec = pipeline.load_recipe(recipe, ["train.tensorboard=false", *overrides])
        return pipeline.distill_stage(rec, run, name, resume=(run / "recipe.yaml").is_file())

    def export(self, name: str, student: Path, **options: Any) -> Path:
        """Exports into artifacts/NAME with the registered ONNX exporter, as `stillroom export` does."""
        return pipeline.export_stage(student, self.out / "artifacts" / name, name, "onnx", **options).root

    def bench(self, kind: str, targets: list, batches: list[int]) -> dict[str, Any]:
        """Benchmarks every target of one kind together into bench/KIND."""
        from stillroom.core.bench_plan import BenchSettings
        from stillroom.serve.bench import benchmark

        where = self.out / "bench" / kind
        settings = BenchSettings(
            batches=batches,
            repeats=self.plan.repeats,
            warmup=1 if self.fast else 2,
            quality_samples=self.plan.quality_samples,
            eval_blocks=self.plan.eval_blocks,
            grid_images=16,
        )
        label = f"{kind}: {', '.join(t.label for t in targets)}"
        return pipeline.bench_stage(where, label, lambda: benchmark(targets, settings, where))

    def _timed(self, name: str, fn, *args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        self.timings[name] = round(time.perf_counter() - start, 1)
        return result

    # -- the whole thing --------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from stillroom.core.bench_plan import Target

        started = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        generators = {}
        for k in self.plan.generator_steps:
            name = f"mnist-{k}step"
            overrides = self.plan.generator_overrides[k]
            student = self._timed(f"distill {name}", self.distill, name, GENERATOR_RECIPE, overrides)
            if k in self.plan.finish_overrides:
                finish = [f"student.init={student}", *self.plan.finish_overrides[k]]
                student = self._timed(f"finish {name}", self.distill, f"{name}-dmd2", FINISH_RECIPE, finish)
            generators[name] = student
        lm_student = self._timed(
            "distill lm", self.distill, "shakespeare-lm", LM_RECIPE, self.plan.lm_overrides
        )

        artifacts = {
            name: self._timed(f"export {name}", self.export, name, student)
            for name, student in generators.items()
        }
        lm_art = self._timed(
            "export lm", self.export, "shakespeare-lm", lm_student, fused=True, last_logits=True
        )
        lm_int8 = self._timed("export lm int8", self.export, "shakespeare-lm-int8", lm_student, int8=True)

        gen_targets = [
            Target(
                "teacher (50-step DDIM)",
                "torch",
                "embedded:mnist_teacher",
                role="teacher",
                options={"steps": 50},
            )
        ]
        gen_targets += [Target(name, "onnxruntime", str(path)) for name, path in artifacts.items()]
        gen_report = self._timed(
            "bench generators", self.bench, "generator", gen_targets, self.plan.generator_batches
        )
        lm_targets = [
            Target("teacher", "torch", "embedded:lm_teacher", role="teacher"),
            Target("shakespeare-lm", "onnxruntime", str(lm_art)),
            Target("shakespeare-lm-int8", "onnxruntime", str(lm_int8)),
        ]
        lm_report = self._timed("bench lm", self.bench, "causal-lm", lm_targets, self.plan.lm_batches)
        summary = summarize([gen_report, lm_report])
        self.timings["total"] = round(time.perf_counter() - started, 1)
        combined = {
            "format_version": 1,
            "fast": self.fast,
            "summary": summary,
            "timings_s": self.timings,
            "reports": {"generator": gen_report, "causal-lm": lm_report},
        }
        write_combined_report(combined, self.out)
        return combined


# -- summary and the combined report ------------------------------------------------------------------
def summarize(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per student at the smallest batch: speedup over the teacher and quality ratio.

    quality ratio = teacher metric / student metric for the primary metric of the kind's family
    (``Family.metric``; lower is better for FID-like and perplexity) and the inverse for a metric
    whose family says ``higher_is_better`` (accuracy), so 1.0 means as good as the teacher and more
    means better.
    """
    rows = []
    for report in reports:
        kind = report["kind"]
        family = get_host().family_of_kind(kind)
        metric = family.metric
        teacher = report.get("teacher") or {}
        t_quality = (teacher.get("quality") or {}).get(metric)
        smallest = min(report["settings"]["batches"])
        for s in report["students"]:
            if "error" in s:
                rows.append({"kind": kind, "student": s["name"], "error": s["error"]})
                continue
            if s["batch"] != smallest:
                continue
            quality = s["quality"].get(metric)
            rows.append(
                {
                    "kind": kind,
                    "student": s["name"],
                    "runtime": s["runtime"],
                    "batch": s["batch"],
                    "p50_ms": s["latency_ms"]["p50"],
                    "teacher_p50_ms": next(
                        (
                            t["latency_ms"]["p50"]
                            for t in teacher.get("by_batch", [])
                            if t.get("batch") == smallest and "latency_ms" in t
                        ),
                        None,
                    ),
                    "speedup": s.get("speedup_p50"),
                    "metric": metric,
                    "student_quality": quality,
                    "teacher_quality": t_quality,
                    "quality_ratio": _ratio(t_quality, quality, family.higher_is_better),
                    "extra": {k: v for k, v in s["quality"].items() if k != metric},
                }
            )
    return rows


def _ratio(teacher: float | None, student: float | None, higher_is_better: bool) -> float | None:
    if not teacher or not student:
        return None
    return student / teacher if higher_is_better else teacher / student


def summary_markdown(rows: list[dict[str, Any]]) -> str:
    head = [
        "student",
        "kind",
        "runtime",
        "batch",
        "p50 ms",
        "teacher p50 ms",
        "speedup",
        "metric",
        "student",
        "teacher",
        "quality ratio",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['student']} | {r['kind']} | error: {r['error']} |")
            continue
        lines.append(
            "| "
            + " | ".join(
                format_value(x)
                for x in (
                    r["student"],
                    r["kind"],
                    r["runtime"],
                    r["batch"],
                    r["p50_ms"],
                    r["teacher_p50_ms"],
                    r["speedup"],
                    r["metric"],
                    r["student_quality"],
                    r["teacher_quality"],
                    r["quality_ratio"],
                )
            )
            + " |"
        )
    return "\n".join(lines)


def write_combined_report(combined: dict[str, Any], out: Path) -> dict[str, Path]:
    """report.json / report.md / report.html for the whole demo (plots and grids embedded)."""
    md = [
        "# stillroom demo",
        "",
        "Quality ratio = teacher / student on the primary metric "
        "(FID-like for generators, perplexity for LMs; 1.0 = as good as the teacher).",
        "",
        summary_markdown(combined["summary"]),
        "",
        "## Stage times (s)",
        "",
    ]
    md += [f"- {k}: {v}" for k, v in combined["timings_s"].items()]
    sections = []
    for kind, report in combined["reports"].items():
        kind_dir = out / "bench" / kind
        md += ["", (kind_dir / "report.md").read_text().replace("# stillroom bench", "## stillroom bench")]
        grids = {}
        for row in [report.get("teacher") or {}, *report["students"]]:
            if row.get("samples"):
                grids[f"{row['name']} [{row['runtime']}]"] = (kind_dir / row["samples"]).read_bytes()
        table = rep.markdown(report)
        sections.append(rep.html_section(report, table, grids, level=2))
    machine = combined["reports"]["causal-lm"]["machine"]
    page = "\n".join(
        [
            rep.PAGE_HEAD.format(title="stillroom demo"),
            "<h1>stillroom demo</h1>",
            "<p>Teachers distilled into students, exported to validated ONNX and benchmarked side by side. "
            "Quality ratio = teacher / student on the primary metric (FID-like for generators, perplexity "
            "for LMs; both lower-is-better), so 1.0 means as good as the teacher.</p>",
            rep.html_table(summary_markdown(combined["summary"])),
            *sections,
            "<h2>Stage times (s)</h2><pre>"
            + html.escape(json.dumps(combined["timings_s"], indent=2))
            + "</pre>",
            "<h2>Machine</h2><pre>" + html.escape(json.dumps(machine, indent=2)) + "</pre></body></html>",
        ]
    )
    write_json(out / "report.json", combined)
    write_text(out / "report.md", "\n".join(md) + "\n")
    write_text(out / "report.html", page)
    return {"json": out / "report.json", "md": out / "report.md", "html": out / "report.html"}


def print_summary(combined: dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        "student",
        "kind",
        "p50 ms",
        "speedup",
        "metric",
        "student",
        "teacher",
        "quality ratio",
        title="stillroom demo"
        + (" (--fast: sizes too small for meaningful numbers)" if combined["fast"] else ""),
    )
    for r in combined["summary"]:
        if "error" in r:
            table.add_row(r["student"], r["kind"], "[red]error", r["error"][:60])
            continue
        table.add_row(
            r["student"],
            r["kind"],
            format_value(r["p50_ms"]),
            f"{format_value(r['speedup'])}x",
            r["metric"],
            format_value(r["student_quality"]),
            format_value(r["teacher_quality"]),
            format_value(r["quality_ratio"]),
        )
    console = Console()
    if not console.is_terminal:  # logs and CI: do not squeeze the table to 80 columns
        console = Console(width=140)
    console.print(table)
    console.print(f"total {combined['timings_s']['total']} s; report: {out / 'report.html'}")
