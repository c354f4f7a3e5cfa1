"""The search: candidates -> measured latency -> strategy score -> the best under the limit -> distilled.

OUT/latency/<hash>.json   each shape's measured latency (``latency.py``; re-runs reuse it)
OUT/leaderboard.json/.md  every candidate: latency, kept or dropped, score, rank
OUT/latency_score.png     score against measured latency, the limit, the default and the pick
OUT/best.yaml             the recipe with the picked student
OUT/best/                 its distillation run (the trainer's run directory), unless --no-distil
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from stillroom.core import recipe as recipes
from stillroom.core.errors import StillroomError
from stillroom.core.fsio import write_text
from stillroom.plugins.lm import data as textdata
from stillroom.plugins.lm import models
from stillroom.plugins.lm.student_search import candidates as grid_
from stillroom.plugins.lm.student_search.candidates import Candidate
from stillroom.plugins.lm.student_search.latency import Timing, measure

log = logging.getLogger(__name__)


@dataclass
class Setup:
    """What every strategy reads: the recipe, the teacher, the default student and a probe batch."""

    recipe: recipes.Recipe
    teacher: Any
    tokenizer: Any
    default: Candidate
    teacher_shape: Candidate
    out: Path
    seed: int
    probe: torch.Tensor  # [B, L] training blocks DisWOT and AutoDistil score on
    blocks: torch.Tensor  # the other training blocks (AutoDistil's super-student trains on them)

    def build(self, candidate: Candidate):
        """A randomly initialised student of this shape (seeded: the same weights every call)."""
        torch.manual_seed(self.seed)
        return models.student_from_teacher_config(self.teacher, candidate.overrides()).eval()

    def student_overrides(self, candidate: Candidate) -> dict[str, Any]:
        """Recipe values that train this shape: teacher-layers init only where the widths allow it."""
        same_widths = (candidate.hidden, candidate.heads, candidate.kv_heads, candidate.intermediate) == (
            self.teacher_shape.hidden,
            self.teacher_shape.heads,
            self.teacher_shape.kv_heads,
            self.teacher_shape.intermediate,
        )
        init = self.recipe.student.init if same_widths else "random"
        config = {**self.recipe.student.config, **candidate.overrides()}
        return {"student": {**self.recipe.student.model_dump(mode="json"), "config": config, "init": init}}


def setup(recipe: recipes.Recipe, out: Path, seed: int, probe_batch: int, probe_len: int) -> Setup:
    """Loads the teacher, reads the default student's shape and draws the probe batch (seeded)."""
    if recipe.student.path is not None:
        raise StillroomError(
            "search-student builds students from config; the recipe's student has a path",
            "remove student.path and describe the student with student.config",
        )
    teacher, tokenizer = models.load_causal_lm(recipe.teacher.path, "teacher")
    teacher.eval()
    default = grid_.of_config(models.student_from_teacher_config(teacher, recipe.student.config).config)
    records = textdata.read_records(textdata.split_files(recipe.data.source, "train"))
    stream = textdata.token_stream(tokenizer, records, max_tokens=probe_batch * probe_len * 64)
    blocks = textdata.TokenBlocks(stream, probe_len).blocks
    order = torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(seed))
    shape = grid_.of_config(teacher.config)
    probe, rest = blocks[order[:probe_batch]], blocks[order[probe_batch:]]
    return Setup(recipe, teacher, tokenizer, default, shape, Path(out), seed, probe, rest)


def latencies(
    s: Setup, shapes: list[Candidate], timing: Timing
) -> tuple[dict[Candidate, dict[str, Any]], dict[str, str]]:
    """Measured latency of every shape (cached in OUT/latency), and ``{name: why}`` for the shapes the
    recipe's exporter refuses (e.g. a head width the fused graph cannot hold): those cannot ship."""
    options = s.recipe.export.exporter_options()
    if s.recipe.export.to != "onnx":
        raise StillroomError(
            f"search-student measures ONNX Runtime latency; the recipe exports to '{s.recipe.export.to}'",
            "set export.to=onnx",
        )
    found, refused = {}, {}
    for n, shape in enumerate(shapes, 1):
        model = s.build(shape)
        try:
            timed = measure(model, s.tokenizer, options, timing, s.out / "latency")
        except StillroomError as err:
            refused[shape.name] = str(err)
            log.warning("[%d/%d] %s: not exportable: %s", n, len(shapes), shape.name, err)
            continue
        found[shape] = {**timed, "params": sum(p.numel() for p in model.parameters())}
        log.info("[%d/%d] %s: %.2f ms", n, len(shapes), shape.name, timed["latency_ms"])
    return found, refused


def diswot_scores(s: Setup, shapes: list[Candidate]) -> dict[Candidate, dict[str, float]]:
    """DisWOT score of every shape (random init) against the teacher on the probe batch."""
    from stillroom.plugins.lm.student_search import diswot

    classes = diswot.probe_classes(s.probe, 128)
    reference = diswot.features(s.teacher, s.probe, classes)
    return {
        shape: diswot.score(reference, diswot.features(s.build(shape), s.probe, classes)) for shape in shapes
    }


def autodistil_scores(
    s: Setup, shapes: list[Candidate], steps: int
) -> tuple[dict[Candidate, dict[str, float]], Any]:
    """AutoDistil: trains the weight-sharing super-student once, then scores every shape with it."""
    from stillroom.plugins.lm.student_search import autodistil

    sup = autodistil.SuperStudent(s.teacher, shapes, s.seed)
    batch = s.recipe.train.batch_size
    history = autodistil.train(sup, shapes, s.blocks, steps, batch, s.recipe.train.lr, seed=s.seed)
    log.info("super-student: relation loss %.4f -> %.4f", history[0], history[-1])
    return autodistil.scores(sup, shapes, s.probe), sup


def rank(
    shapes: list[Candidate],
    timed: dict[Candidate, dict[str, Any]],
    scores: dict[Candidate, dict[str, float]],
    limit_ms: float,
    default: Candidate,
) -> list[dict[str, Any]]:
    """Leaderboard rows: kept candidates by score (best first), then those over the limit."""
    rows = [
        {
            **shape.as_json(),
            "latency_ms": timed[shape]["latency_ms"],
            "per_token_ms": timed[shape]["per_token_ms"],
            "params": timed[shape]["params"],
            "kept": timed[shape]["latency_ms"] <= limit_ms,
            "default": shape == default,
            **scores[shape],
        }
        for shape in shapes
    ]
    rows.sort(key=lambda r: (not r["kept"], -r["score"]))
    for n, row in enumerate(r for r in rows if r["kept"]):
        row["rank"] = n + 1
    return rows


def best_recipe(s: Setup, best: Candidate, steps: int | None, init_dir: Path | None = None) -> recipes.Recipe:
    """The recipe with the picked student (``steps``: its train budget, default the recipe's), started
    from the weights in ``init_dir`` when given (AutoDistil's extracted sub-network)."""
    data = {**s.recipe.to_dict(), **s.student_overrides(best)}
    if init_dir is not None:
        data["student"] = {**data["student"], "path": str(init_dir), "config": {}}
    if steps is not None:
        data["train"] = {**data["train"], "steps": steps}
    data["description"] = f"{data['description']} [search-student: {best.name}]".strip()
    return recipes.validate(data)


def distil(recipe: recipes.Recipe, run_dir: Path) -> dict[str, float]:
    """Trains ``recipe`` into ``run_dir`` and returns its final eval; a finished (or checkpointed) run
    of the same recipe is reused, one of another recipe refused."""
    from stillroom.core.trainer import Trainer

    saved = run_dir / "recipe.yaml"
    if saved.is_file() and recipes.validate(yaml.safe_load(saved.read_text())).to_dict() != recipe.to_dict():
        raise StillroomError(f"'{run_dir}' holds a run of another recipe", "choose another --out")
    if not (run_dir / "run.json").is_file():
        Trainer(recipe, run_dir).fit(resume=(run_dir / "checkpoints").is_dir())
    return json.loads((run_dir / "run.json").read_text(encoding="utf-8"))["final_eval"]


def write_best(out: Path, recipe: recipes.Recipe) -> None:
    write_text(out / "best.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))


def save_student(s: Setup, model, out: Path) -> None:
    """A transformers directory (model + the teacher's tokenizer) the recipe's ``student.path`` loads."""
    from stillroom.core.fsio import atomic_dir

    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        s.tokenizer.save_pretrained(tmp)
