"""From a recipe to a benchmark: ``train`` -> ``export`` -> ``bench``, one stage at a time or all at once.

The three operations are the public API's (``from stillroom import train, export_model, bench``) and
go through the same registry calls a user makes by hand: the trainer runs the method registered as
``method.name``, ``export_model`` the exporter registered as ``to``, ``bench`` the registered runtimes.

``run`` (``stillroom run``) chains them, driven by the recipe's ``export`` and ``bench`` sections::

    RUN/            the training run (run.json is written last)
    RUN/artifact    the exported student (manifest.json is written last; ``artifact.load`` verifies it)
    RUN/bench       report.json + report.html (report.html is written last)

Each stage writes its result atomically and is skipped on a re-run when that result is present and
valid, so an interrupted run continues where it stopped; ``stillroom demo`` drives its students
through the same stages. A run directory belongs to one recipe (its ``recipe.yaml``): re-running it
with another recipe is refused, since reusing its student, artifact or report would silently answer a
different question.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from stillroom.core import recipe as recipes
from stillroom.core.errors import StillroomError
from stillroom.core.host import get_host

if TYPE_CHECKING:
    from stillroom.core.artifact import Artifact

log = logging.getLogger(__name__)

RecipeSource = str | Path | Mapping[str, Any] | recipes.Recipe


def load_recipe(source: RecipeSource, overrides: Iterable[str] = ()) -> recipes.Recipe:
    """A validated recipe from a YAML file, a shipped recipe's name, a mapping or a recipe, with
    ``KEY=VALUE`` overrides applied (dotted paths, values parsed as YAML)."""
    if isinstance(source, recipes.Recipe):
        data = source.to_dict()
    elif isinstance(source, Mapping):
        data = dict(source)
    else:
        data = recipes.load_yaml(source)
    return recipes.validate(recipes.apply_overrides(data, list(overrides)))


def train(recipe: RecipeSource, out: str | Path, overrides: Iterable[str] = (), resume: bool = False) -> Path:
    """Trains a student into the run directory ``out`` and returns the student's directory.

    ``resume`` continues the run in ``out`` from its latest checkpoint (same recipe required).
    """
    from stillroom.core.trainer import Trainer

    return Trainer(load_recipe(recipe, overrides), Path(out)).fit(resume=resume)


def export_model(src: str | Path, out: str | Path, to: str = "onnx", **options: Any) -> Artifact:
    """Exports ``src`` (a run, a student or model directory) with the exporter registered as ``to``.

    ``options`` are the exporter's keyword options (onnx: int8, fp16, opset, steps, optimize, fused,
    last_logits, weight_only); the artifact in ``out`` exists only once validation passed.
    """
    from stillroom.export.command import run_exporter

    return run_exporter(src, out, to, **options)


def bench(
    artifact: str | Path,
    out: str | Path,
    teacher: str | None = None,
    runtimes: Iterable[str] = ("onnxruntime",),
    batches: Iterable[int] = (1,),
    warmup: int = 2,
    repeats: int = 10,
    **settings: Any,
) -> dict[str, Any]:
    """Benchmarks ``artifact`` on each runtime against its teacher and writes the report into ``out``.

    ``teacher`` defaults to the teacher the student was distilled from; ``settings`` are further
    ``stillroom.core.bench_plan.BenchSettings`` fields (new_tokens, prompt_tokens, quality_samples,
    ...). Returns the report (the schema of ``stillroom.serve.report``).
    """
    from stillroom.core.bench_plan import BenchSettings
    from stillroom.serve.bench import run_bench

    names = list(runtimes)
    for name in names:
        get_host().runtime(name)  # an unknown runtime: one clear line before any work
    plan = BenchSettings(batches=list(batches), warmup=warmup, repeats=repeats, **settings)
    return run_bench(artifact, out, teacher=teacher, runtimes=names, settings=plan)


# -- stages: each skipped when its result is present and valid ----------------------------------------
def distill_stage(recipe: recipes.Recipe, run: Path, label: str, resume: bool = False) -> Path:
    """Trains into ``run`` unless it already finished with this recipe."""
    run = Path(run)
    _check_same_recipe(recipe, run)
    if (run / "run.json").is_file() and (run / "student").is_dir():
        log.info("[skip] %s: already distilled (%s)", label, run)
        return run / "student"
    log.info("[distill] %s: method %s, %d steps", label, recipe.method_name, recipe.train.steps)
    return train(recipe, run, resume=resume)


def export_stage(src: Path, out: Path, label: str, to: str = "onnx", **options: Any) -> Artifact:
    """Exports into ``out`` unless a verified artifact is already there."""
    done = _exported(Path(out), to)
    if done is not None:
        log.info("[skip] %s: artifact present and verified", label)
        return done
    log.info("[export] %s %s", label, options or "")
    return export_model(src, out, to, **options)


def bench_stage(out: Path, label: str, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Runs ``measure`` (which writes its report into ``out``) unless that report is there."""
    out = Path(out)
    if (out / "report.html").is_file() and (out / "report.json").is_file():
        log.info("[skip] bench %s: report present", label)
        return json.loads((out / "report.json").read_text(encoding="utf-8"))
    log.info("[bench] %s", label)
    return measure()


def _exported(out: Path, to: str) -> Artifact | None:
    """The verified artifact in ``out`` (Triton's repository is ``out`` itself), or in ``out/<to>``
    where the TensorRT exporter puts its engine beside the ONNX export it builds on."""
    from stillroom.core import artifact

    for where in (out, out / to):
        try:
            return artifact.load(where)
        except StillroomError:
            continue
    return None


def _check_same_recipe(recipe: recipes.Recipe, run: Path) -> None:
    """Refuses a run folder started with another recipe. Both sides go through today's recipe model,
    so a field a newer stillroom added (at its default) does not make an old run look different; the
    ``description`` is documentation and is not compared."""
    saved = run / "recipe.yaml"
    if not saved.is_file():
        return
    try:
        before = recipes.validate(yaml.safe_load(saved.read_text(encoding="utf-8"))).to_dict()
        same = {**before, "description": ""} == {**recipe.to_dict(), "description": ""}
    except (OSError, ValueError, yaml.YAMLError, StillroomError):
        same = False
    if not same:
        raise StillroomError(
            f"'{run}' was started with a different recipe",
            "re-run with the same recipe and overrides, or choose another --out",
        )


# -- the whole chain ------------------------------------------------------------------------------------
@dataclass
class RunResult:
    """What ``stillroom run`` produced: the student directory, the artifact (None when the family's
    output is its own artifact, e.g. a distilled dataset: ``student`` is then the artifact) and the
    bench report."""

    student: Path
    artifact: Artifact | None
    report: dict[str, Any]

    @property
    def artifact_dir(self) -> Path:
        return self.student if self.artifact is None else self.artifact.root


def run(recipe: recipes.Recipe, out: str | Path, resume: bool = False) -> RunResult:
    """Trains, exports (``recipe.export``; skipped for a family whose output is the artifact) and
    benchmarks (``recipe.bench``) into ``out``."""
    out = Path(out)
    label = out.name
    student = distill_stage(recipe, out, label, resume)
    art = None
    if get_host().output_family(student) is None:
        spec = recipe.export
        art = export_stage(out, out / "artifact", label, spec.to, **spec.exporter_options())
    b = recipe.bench
    result = RunResult(student, art, {})
    result.report = bench_stage(
        out / "bench",
        label,
        lambda: bench(
            result.artifact_dir,
            out / "bench",
            runtimes=b.runtimes,
            batches=b.batch,
            warmup=b.warmup,
            repeats=b.repeats,
            new_tokens=b.new_tokens,
            prompt_tokens=b.prompt_tokens,
            quality_samples=b.samples,
            metrics=b.metrics,
        ),
    )
    return result
