"""The ``stillroom search-student`` command (registered by the LM family's ``register_commands``)."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import click

log = logging.getLogger(__name__)


def _ints(text: str | None) -> list[int] | None:
    return [int(v) for v in text.split(",")] if text else None


@click.command("search-student")
@click.argument("recipe")
@click.argument("overrides", nargs=-1)
@click.option(
    "--latency-ms",
    type=click.FloatRange(min=0, min_open=True),
    required=True,
    help="Latency limit: the median of a short batch-1 generation, measured.",
)
@click.option(
    "--runtime",
    type=click.Choice(["onnxruntime"]),
    default="onnxruntime",
    show_default=True,
    help="The runtime the student ships on (latency is measured there).",
)
@click.option(
    "--strategy",
    type=click.Choice(["diswot", "autodistil"]),
    default="diswot",
    show_default=True,
    help="How candidates are ranked.",
)
@click.option(
    "--layers", default=None, help="Candidate depths, e.g. 1,2,3 (default: 1 .. max(student, teacher))."
)
@click.option("--hidden", default=None, help="Candidate hidden sizes (default: 1/2, 3/4, 1 x the student's).")
@click.option("--heads", default=None, help="Candidate head counts (default: the student's and half of it).")
@click.option(
    "--prompt-tokens",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Timed generation: prompt length.",
)
@click.option(
    "--new-tokens",
    type=click.IntRange(min=2),
    default=16,
    show_default=True,
    help="Timed generation: new tokens.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="ONNX Runtime intra-op threads (default: its own).",
)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=None,
    help="Distillation steps of the picked student (default: the recipe's).",
)
@click.option("--distil/--no-distil", default=True, show_default=True, help="Distil the picked student.")
@click.option(
    "--super-steps",
    type=click.IntRange(min=1),
    default=200,
    show_default=True,
    help="autodistil: task-agnostic distillation steps of the super-student.",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="seed of the random-init candidates and the probe batch",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output directory (default: runs/search-student-<recipe name>).",
)
def search_student(
    recipe: str,
    overrides: tuple[str, ...],
    latency_ms: float,
    runtime: str,
    strategy: str,
    layers: str | None,
    hidden: str | None,
    heads: str | None,
    prompt_tokens: int,
    new_tokens: int,
    threads: int | None,
    steps: int | None,
    distil: bool,
    super_steps: int,
    seed: int,
    out: Path | None,
) -> None:
    """Search the student shape of RECIPE (layers x hidden x heads x MLP) under a latency limit
    measured on RUNTIME, rank the candidates with STRATEGY, and distil the best."""
    from stillroom.core import recipe as recipes
    from stillroom.core.errors import StillroomError
    from stillroom.plugins.lm.student_search import report, search
    from stillroom.plugins.lm.student_search.candidates import grid
    from stillroom.plugins.lm.student_search.latency import Timing

    out = out or Path("runs") / f"search-student-{Path(recipe).stem}"
    parsed = recipes.load(recipe, list(overrides))
    s = search.setup(parsed, out, seed, probe_batch=8, probe_len=64)
    shapes = grid(s.default, s.teacher_shape, _ints(layers), _ints(hidden), _ints(heads))
    shapes = sorted({*shapes, s.default})
    timing = Timing(runtime, prompt_tokens, new_tokens, threads=threads)
    timed, refused = search.latencies(s, shapes, timing)
    shapes = list(timed)
    init_dir = None
    if strategy == "autodistil":
        scores, sup = search.autodistil_scores(s, shapes, super_steps)
    else:
        scores = search.diswot_scores(s, shapes)
    rows = search.rank(shapes, timed, scores, latency_ms, s.default)
    kept = [r for r in rows if r["kept"]]
    if not kept:
        fastest = min(rows, key=lambda r: r["latency_ms"])
        raise StillroomError(
            f"no candidate runs within {latency_ms} ms on {runtime} (fastest: {fastest['name']}, "
            f"{fastest['latency_ms']:.2f} ms)",
            "raise --latency-ms or add smaller shapes (--layers, --hidden, --heads)",
        )
    best = next(shape for shape in shapes if shape.name == kept[0]["name"])
    result = {
        "strategy": strategy,
        "runtime": runtime,
        "latency_limit_ms": latency_ms,
        "timing": asdict(timing),
        "kept": len(kept),
        "best": best.name,
        "default": s.default.name,
        "candidates": rows,
        "not_exportable": refused,
    }
    if strategy == "autodistil":
        init_dir = out / "best_init"
        search.save_student(s, sup.extract(best), init_dir)
    best_recipe = search.best_recipe(s, best, steps, init_dir)
    search.write_best(out, best_recipe)
    if distil:
        result["distilled"] = {best.name: search.distil(best_recipe, out / "best")}
    report.write(out, result)
    print_leaderboard(result, out)


def print_leaderboard(result: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("rank", "candidate", "params (M)", "latency ms", "score", "note", title="search-student")
    for r in result["candidates"]:
        note = "default" if r["default"] else ""
        note += (" picked" if r["name"] == result["best"] else "") + ("" if r["kept"] else "over limit")
        table.add_row(
            str(r.get("rank", "-")),
            r["name"],
            f"{r['params'] / 1e6:.2f}",
            f"{r['latency_ms']:.2f}",
            f"{r['score']:.4f}",
            note.strip(),
        )
    Console().print(table)
    for name, final in (result.get("distilled") or {}).items():
        log.info("distilled %s: %s", name, final)
    log.info("report: %s; recipe: %s", out / "leaderboard.md", out / "best.yaml")
