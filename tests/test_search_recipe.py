"""``stillroom search-recipe``: the space comes from the method's schema, trials are short runs scored
with the family's metric, the leaderboard and best recipe are written, and a search resumes (also
after a crash mid-trial); ``data.augment`` noise."""

from __future__ import annotations

import json
from typing import Literal

import pytest
import torch
from pydantic import Field

from stillroom.cli import main
from stillroom.core import recipe as recipes
from stillroom.core.errors import StillroomError
from stillroom.core.method import Params
from stillroom.plugins.lm.augment import random_replace
from stillroom.plugins.lm.methods.hidden import Hidden, HiddenParams
from stillroom.plugins.lm.methods.kd import KD, KDParams
from stillroom.search import recipe_search
from stillroom.search.space import space_of
from tests.conftest import lm_recipe


def test_the_space_is_read_from_the_methods_schema():
    dims = {d.key: d for d in space_of(KD, (0.5, 4.0), fixed=set())}
    assert set(dims) == {"method.divergence", "data.augment", "method.temperature"}
    assert dims["method.divergence"].choices == KDParams.model_fields["divergence"].annotation.__args__
    assert "random-replace" in dims["data.augment"].choices
    assert (dims["method.temperature"].low, dims["method.temperature"].high) == (0.5, 4.0)
    hidden = {d.key: d for d in space_of(Hidden, (0.5, 4.0), fixed={"method.divergence"})}
    assert "method.divergence" not in hidden  # fixed by an override
    assert (
        hidden["method.hidden_loss"].choices == HiddenParams.model_fields["hidden_loss"].annotation.__args__
    )

    class Wider(KD):  # a value the schema accepts is searched with no change to the search
        class Params(Params):
            divergence: Literal["fkl", "brand-new"] = "fkl"
            temperature: float = Field(1.0, ge=1.5, le=3.0)

    dims = {d.key: d for d in space_of(Wider, (0.5, 4.0), fixed=set())}
    assert dims["method.divergence"].choices == ("fkl", "brand-new")
    assert (dims["method.temperature"].low, dims["method.temperature"].high) == (1.5, 3.0)
    with pytest.raises(StillroomError, match="temperature range"):
        space_of(Wider, (3.5, 4.0), fixed=set())


def _leaderboard(out):
    return json.loads((out / "leaderboard.json").read_text())


def test_two_trials_write_a_leaderboard_and_a_valid_best_recipe_and_resume(
    tmp_path, tiny_teacher, corpus_dir, write_recipe
):
    recipe = write_recipe(lm_recipe(tiny_teacher, corpus_dir, checkpoint_every=0, steps=5))
    out = tmp_path / "search"
    main(["search-recipe", str(recipe), "--trials", "2", "--steps", "2", "--out", str(out)])
    board = _leaderboard(out)
    assert board["metric"] == "perplexity" and board["direction"] == "minimize"
    done = board["trials"]
    assert [t["state"] for t in done] == ["complete", "complete"] and [t["rank"] for t in done] == [1, 2]
    assert done[0]["perplexity"] <= done[1]["perplexity"]
    for t in done:  # each trial is a real short run, scored on its own final evaluation
        run = json.loads((out / t["run"] / "run.json").read_text())
        assert run["steps"] == 2 and run["final_eval"]["perplexity"] == t["perplexity"]
    best = recipes.load(out / "best.yaml")  # validates
    assert best.train.steps == 5  # the full budget, not the trial's
    assert best.method.divergence == done[0]["params"]["method.divergence"]
    assert best.data.augment == done[0]["params"]["data.augment"]
    assert best.method.temperature == pytest.approx(done[0]["params"]["method.temperature"])
    assert "| rank |" in (out / "leaderboard.md").read_text()

    first = (out / done[0]["run"] / "run.json").stat().st_mtime_ns
    main(["search-recipe", str(recipe), "--trials", "3", "--steps", "2", "--out", str(out)])
    board = _leaderboard(out)
    assert sorted(t["trial"] for t in board["trials"]) == [0, 1, 2]  # one more, the two kept
    assert (out / done[0]["run"] / "run.json").stat().st_mtime_ns == first

    with pytest.raises(StillroomError, match="another recipe"):
        recipe_search.prepare(recipe, ["method.kd_ratio=0.2"], out, 2, (0.5, 4.0))


def test_a_trial_left_running_by_a_crash_runs_again(tmp_path, tiny_teacher, corpus_dir, write_recipe):
    recipe = write_recipe(lm_recipe(tiny_teacher, corpus_dir, checkpoint_every=0))
    search = recipe_search.prepare(recipe, ["data.augment=none"], tmp_path / "s", 2, (0.5, 4.0))
    study = recipe_search.open_study(search, seed=0)
    crashed = study.ask()  # asked, never told: what a killed process leaves in the journal
    values = {d.key: d.suggest(crashed) for d in search.dims}
    (tmp_path / "s" / "trials" / "0000").mkdir(parents=True)
    result = recipe_search.run_search(search, trials=1)
    (row,) = result["trials"]
    assert row["state"] == "complete" and row["trial"] == 1 and row["params"] == values
    states = [t.state.name for t in recipe_search.open_study(search, 0).get_trials()]
    assert states == ["FAIL", "COMPLETE"] and not (tmp_path / "s" / "trials" / "0000").exists()


def test_random_replace_noises_only_counted_inputs_deterministically():
    ids = torch.arange(2 * 400).view(2, 400) % 50
    labels = ids.clone()
    labels[0, :100] = -100  # a prompt: never noised
    batch = {"input_ids": ids, "labels": labels, "index": torch.tensor([3, 7])}
    noisy = random_replace(batch, vocab_size=1000, p=0.25, seed=0)
    changed = noisy != ids
    assert not changed[0, :100].any()
    assert 0.15 < changed[:, 100:].float().mean() < 0.35  # p, less the replacements that drew the same id
    assert torch.equal(noisy, random_replace(batch, 1000, 0.25, 0))
    assert not torch.equal(noisy, random_replace({**batch, "index": torch.tensor([4, 7])}, 1000, 0.25, 0))
    assert torch.equal(batch["labels"], labels)  # labels stay the clean text


def test_augmentation_refuses_the_teacher_cache(tmp_path, tiny_teacher, corpus_dir):
    from stillroom.core.trainer import Trainer

    d = lm_recipe(tiny_teacher, corpus_dir, checkpoint_every=0)
    d["teacher"]["cache"] = "topk"
    d["data"]["augment"] = "random-replace"
    with pytest.raises(StillroomError, match="top-k cache"):
        Trainer(recipes.validate(d), tmp_path / "run").fit()
