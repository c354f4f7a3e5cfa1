"""``stillroom search-recipe``: an Optuna search over a recipe's objective, temperature and augmentation.

Distiller (He et al. 2021, "Distiller: A Systematic Study of Model Distillation Methods in Natural
Language Processing") finds that the best distillation recipe depends on the task and searches the
objective, temperature and augmentation jointly. Each trial here is a short run of the recipe
(``--steps``) with the trial's values as overrides (``space.py`` reads the dimensions from the
method's schema), scored on the method's held-out evaluation with its family's metric
(``Family.metric``, maximised when ``Family.higher_is_better``, else minimised)::

    OUT/search.json       the base recipe, the space and the metric (a resumed search must match it)
    OUT/study.journal     the Optuna study (JournalStorage): re-running the command resumes it
    OUT/trials/NNNN/      one training run per trial (the trainer's run directory)
    OUT/leaderboard.json  every trial, best first; OUT/leaderboard.md the same as a table
    OUT/best.yaml         the base recipe with the best trial's values (its full train budget)

A trial a crash left running is marked failed on resume and its values are tried again.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from stillroom.core import recipe as recipes
from stillroom.core.errors import StillroomError
from stillroom.core.fsio import write_json, write_text
from stillroom.core.host import get_host
from stillroom.search.space import Dimension, space_of

log = logging.getLogger(__name__)

STUDY = "search-recipe"


@dataclass
class Search:
    """What every trial shares: the base recipe, the space, the metric and its direction."""

    base: dict[str, Any]
    dims: list[Dimension]
    metric: str
    higher_is_better: bool
    steps: int
    out: Path

    @property
    def direction(self) -> str:
        return "maximize" if self.higher_is_better else "minimize"

    def trial_recipe(self, values: dict[str, Any], short: bool = True) -> recipes.Recipe:
        """The base recipe with ``values`` (dotted keys); ``short``: the trial's train budget."""
        train = {"train.steps": self.steps, "train.checkpoint_every": 0, "train.tensorboard": False}
        return recipes.validate(with_values(self.base, {**values, **(train if short else {})}))


def with_values(data: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``data`` with each dotted key set (sections created as needed)."""
    out = copy.deepcopy(data)
    for key, value in values.items():
        *path, last = key.split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def family_metric(method_cls: type) -> tuple[str, bool]:
    """(metric, higher_is_better) of the family the method belongs to."""
    families = get_host().registry["families"]
    family = families.get(method_cls.family)
    if family is None or not family.metric:
        raise StillroomError(
            f"method '{method_cls.name}' belongs to family '{method_cls.family}', which names no metric",
            f"search a method of a family with a metric ({', '.join(sorted(families)) or 'none installed'})",
        )
    return family.metric, bool(family.higher_is_better)


def prepare(
    recipe: str | Path, overrides: list[str], out: Path, steps: int, temperature: tuple[float, float]
) -> Search:
    """Validates the recipe, builds the space and checks that ``out`` holds no other search."""
    base = recipes.validate(recipes.apply_overrides(recipes.load_yaml(recipe), overrides))
    method_cls = get_host().method(base.method_name)
    metric, higher = family_metric(method_cls)
    fixed = {item.partition("=")[0].strip() for item in overrides}
    search = Search(
        base.to_dict(), space_of(method_cls, temperature, fixed), metric, higher, steps, Path(out)
    )
    record = {
        "format_version": 1,
        "recipe": search.base,
        "space": [asdict(d) for d in search.dims],
        "metric": metric,
        "direction": search.direction,
        "steps": steps,
    }
    record = json.loads(json.dumps(record))  # tuples as lists, as the file holds them
    saved = search.out / "search.json"
    if saved.is_file():
        if json.loads(saved.read_text(encoding="utf-8")) != record:
            raise StillroomError(
                f"'{search.out}' holds a search of another recipe, space or budget",
                "re-run with the same recipe, overrides and options, or choose another --out",
            )
    else:
        search.out.mkdir(parents=True, exist_ok=True)
        write_json(saved, record)
    return search


def open_study(search: Search, seed: int):
    """The search's Optuna study (TPE, seeded), created or re-opened from OUT/study.journal."""
    try:
        import optuna
    except ImportError:
        raise StillroomError(
            "stillroom search-recipe needs Optuna, which is not installed", "pip install 'stillroom[search]'"
        ) from None
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(search.out / "study.journal")))
    return optuna.create_study(
        study_name=STUDY,
        storage=storage,
        direction=search.direction,
        sampler=optuna.samplers.TPESampler(seed=seed),
        load_if_exists=True,
    )


def _retry_stale(study, search: Search) -> None:
    """Trials a stopped process left RUNNING: failed, their run folders removed, their values re-queued."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL)
        shutil.rmtree(search.out / "trials" / f"{trial.number:04d}", ignore_errors=True)
        study.enqueue_trial(trial.params)
        log.info("trial %d was interrupted: it runs again", trial.number)


def run_search(search: Search, trials: int, budget_minutes: float | None = None, seed: int = 0):
    """Runs trials until the study holds ``trials`` finished ones (or the budget is spent)."""
    from stillroom.core.trainer import Trainer

    study = open_study(search, seed)
    _retry_stale(study, search)

    def objective(trial) -> float:
        values = {d.key: d.suggest(trial) for d in search.dims}
        run_dir = search.out / "trials" / f"{trial.number:04d}"
        trial.set_user_attr("run", str(run_dir.relative_to(search.out)))
        log.info("trial %d: %s", trial.number, values)
        started = time.perf_counter()
        try:
            Trainer(search.trial_recipe(values), run_dir).fit()
            final = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))["final_eval"]
            if search.metric not in final:
                raise StillroomError(
                    f"the method's evaluation reports {sorted(final)}, not '{search.metric}'",
                    "search a method whose evaluate() reports its family's metric",
                )
        except StillroomError as err:
            trial.set_user_attr("error", str(err))
            raise
        finally:
            trial.set_user_attr("seconds", round(time.perf_counter() - started, 2))
        trial.set_user_attr("eval", final)
        return float(final[search.metric])

    remaining = trials - len(finished(study))
    if remaining > 0:
        timeout = budget_minutes * 60 if budget_minutes else None
        study.optimize(objective, n_trials=remaining, timeout=timeout, catch=(StillroomError,))
    return write_results(search, study)


def finished(study) -> list[Any]:
    """Trials that completed or failed with an error (not those an interrupted process left behind)."""
    from optuna.trial import TrialState

    states = (TrialState.COMPLETE, TrialState.FAIL)
    return [
        t
        for t in study.get_trials(deepcopy=False, states=states)
        if t.state == TrialState.COMPLETE or "error" in t.user_attrs
    ]


def leaderboard(search: Search, study) -> list[dict[str, Any]]:
    """Finished trials, best first (failed ones last, with their error)."""
    rows = []
    for t in finished(study):
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name.lower(),
                "params": t.params,
                search.metric: t.value,
                "eval": t.user_attrs.get("eval", {}),
                "seconds": t.user_attrs.get("seconds"),
                "run": t.user_attrs.get("run"),
                "error": t.user_attrs.get("error"),
            }
        )
    sign = -1 if search.higher_is_better else 1
    done = sorted((r for r in rows if r["state"] == "complete"), key=lambda r: sign * r[search.metric])
    for rank, row in enumerate(done, 1):
        row["rank"] = rank
    return done + [r for r in rows if r["state"] != "complete"]


def write_results(search: Search, study) -> dict[str, Any]:
    """Writes leaderboard.json / .md and best.yaml; returns the leaderboard record."""
    rows = leaderboard(search, study)
    best = rows[0] if rows and rows[0]["state"] == "complete" else None
    result = {
        "metric": search.metric,
        "direction": search.direction,
        "steps_per_trial": search.steps,
        "space": [d.key for d in search.dims],
        "best": best,
        "trials": rows,
    }
    write_json(search.out / "leaderboard.json", result)
    write_text(search.out / "leaderboard.md", markdown(search, rows))
    if best is not None:
        recipe = search.trial_recipe(best["params"], short=False)
        data = recipe.to_dict()
        data["description"] = f"{data['description']} [search-recipe best: {best['params']}]".strip()
        write_text(search.out / "best.yaml", yaml.safe_dump(data, sort_keys=False))
    return result


def markdown(search: Search, rows: list[dict[str, Any]]) -> str:
    keys = [d.key for d in search.dims]
    head = [
        "rank",
        "trial",
        *keys,
        f"{search.metric} ({'higher' if search.higher_is_better else 'lower'} is better)",
        "s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        value = f"{r[search.metric]:.4f}" if r[search.metric] is not None else f"failed: {r['error']}"
        cells = [str(r.get("rank", "-")), str(r["trial"]), *(fmt(r["params"].get(k)) for k in keys)]
        lines.append("| " + " | ".join([*cells, value, str(r["seconds"])]) + " |")
    return f"# search-recipe: {len(rows)} trials, {search.steps} steps each\n\n" + "\n".join(lines) + "\n"


def fmt(value: Any) -> str:
    """A searched value as a table cell."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)
