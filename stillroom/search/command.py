"""The ``stillroom search-recipe`` command: options, the search, and a rich leaderboard."""

from __future__ import annotations

import logging
from pathlib import Path

import click


@click.command("search-recipe")
@click.argument("recipe")
@click.argument("overrides", nargs=-1)
@click.option("--trials", type=click.IntRange(min=1), default=20, show_default=True, help="Trials in all.")
@click.option(
    "--budget-minutes",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Stop starting trials after this long.",
)
@click.option(
    "--steps", type=click.IntRange(min=1), default=100, show_default=True, help="Training steps per trial."
)
@click.option(
    "--temperature",
    type=(float, float),
    default=(0.5, 4.0),
    show_default=True,
    help="Log-uniform range of method.temperature.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the TPE sampler.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Search directory (default: runs/search-<recipe name>); re-running resumes it.",
)
def search_recipe(
    recipe: str,
    overrides: tuple[str, ...],
    trials: int,
    budget_minutes: float | None,
    steps: int,
    temperature: tuple[float, float],
    seed: int,
    out: Path | None,
) -> None:
    """Search RECIPE's objective, temperature and augmentation with Optuna (short trials), print a
    leaderboard and write OUT/best.yaml. KEY=VALUE overrides are fixed, not searched."""
    from stillroom.search.recipe_search import prepare, run_search

    out = out or Path("runs") / f"search-{Path(recipe).stem}"
    search = prepare(recipe, list(overrides), out, steps, temperature)
    result = run_search(search, trials, budget_minutes, seed)
    print_leaderboard(result, out)


def print_leaderboard(result: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from stillroom.search.recipe_search import fmt

    metric, keys = result["metric"], result["space"]
    better = "higher" if result["direction"] == "maximize" else "lower"
    table = Table("rank", "trial", *keys, f"{metric} ({better} is better)", "s", title="search-recipe")
    for row in result["trials"]:
        value = f"{row[metric]:.4f}" if row[metric] is not None else f"[red]failed: {row['error']}"
        params = [fmt(row["params"].get(k)) for k in keys]
        table.add_row(str(row.get("rank", "-")), str(row["trial"]), *params, value, str(row["seconds"]))
    Console().print(table)
    done = "best recipe: " + str(out / "best.yaml") if result["best"] else "no trial finished"
    logging.getLogger("stillroom").info("%s; leaderboard: %s", done, out / "leaderboard.md")
