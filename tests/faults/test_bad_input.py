"""Property-based: any recipe or override a user can type ends in success or one clean line.

Invalid input must raise `StillroomError` (one line, no traceback), exit non-zero through the CLI,
and write nothing anywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stillroom.cli import main
from stillroom.core import recipe as recipes
from stillroom.core.errors import StillroomError
from tests.conftest import lm_recipe

SECTIONS = ["method", "teacher", "student", "data", "train", "export", "bench", "bogus"]
KEYS = [
    "name",
    "steps",
    "lr",
    "temperature",
    "kd_ratio",
    "path",
    "config",
    "init",
    "source",
    "seq_len",
    "batch_size",
    "ema",
    "schedule",
    "device",
    "divergence",
    "to",  # export.to and bench.runtimes are checked against the plugin registries
    "runtimes",
    "x",
    "",
    "..",
    "a.b",
    "🙂",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.just("kd"),
    st.just("../../etc/passwd"),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(KEYS), inner, max_size=3)
    ),
    max_leaves=6,
)
recipes_st = st.dictionaries(
    st.sampled_from(SECTIONS),
    st.one_of(values, st.dictionaries(st.sampled_from(KEYS), values, max_size=4)),
    max_size=5,
)
override_st = st.builds(
    lambda k, v: f"{k}={v}",
    st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz._=[]{}:-0123456789 "), max_size=20),
    st.text(max_size=15),
)


def single_line(err: BaseException) -> bool:
    return "\n" not in str(err) and len(str(err)) < 2000


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(recipes_st)
def test_any_recipe_is_valid_or_one_line_error(data):
    try:
        recipes.validate(data)
    except StillroomError as err:
        assert single_line(err)


@settings(max_examples=300, deadline=None)
@given(st.lists(override_st, max_size=4))
def test_any_override_is_applied_or_one_line_error(overrides):
    base = lm_recipe(Path("/nonexistent/teacher"), Path("/nonexistent/corpus"))
    try:
        recipes.validate(recipes.apply_overrides(base, overrides))
    except StillroomError as err:
        assert single_line(err)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(override_st, min_size=1, max_size=3))
def test_cli_rejects_bad_input_cleanly_and_writes_nothing(
    tmp_path, capsys, tiny_teacher, corpus_dir, overrides
):
    work = tmp_path / "cwd"
    work.mkdir(exist_ok=True)
    recipe = work / "r.yaml"
    recipe.write_text(yaml.safe_dump(lm_recipe(tiny_teacher, corpus_dir)))
    before = sorted(os.listdir(work))
    # a bad key guaranteed on top of the random ones, so the run always fails before training
    args = ["distill", str(recipe), *overrides, "train.not_a_key=1", "--out", str(work / "run")]
    cwd = os.getcwd()
    os.chdir(work)
    try:
        with pytest.raises(SystemExit) as info:
            main(args)
    finally:
        os.chdir(cwd)
    assert info.value.code != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") <= 2, err
    assert sorted(os.listdir(work)) == before
