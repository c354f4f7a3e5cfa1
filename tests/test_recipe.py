"""Recipe validation: every bad key is named by its dotted path, overrides apply, names resolve."""

from __future__ import annotations

import pytest

from stillroom.core import recipe as recipes
from stillroom.core.errors import StillroomError
from tests.conftest import lm_recipe


def good(tmp_path):
    return lm_recipe(tmp_path / "teacher", tmp_path / "corpus")


def test_valid_recipe_round_trips(tmp_path):
    rec = recipes.validate(good(tmp_path))
    assert rec.method_name == "kd" and rec.method.temperature == 2.0
    assert recipes.validate(rec.to_dict()).to_dict() == rec.to_dict()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr_rate=1", "recipe key 'train.lr_rate' is not accepted (accepted: steps, batch_size"),
        (
            "method.temprature=2",
            "recipe key 'method.temprature' is not accepted (accepted: divergence, temperature, kd_ratio",
        ),
        ("student.init=magic", "recipe key 'student.init'"),
        ("train.steps=-3", "recipe key 'train.steps': Input should be greater than 0"),
        ("train.steps=many", "recipe key 'train.steps'"),
        ("data.seq_len=[1,2]", "recipe key 'data.seq_len'"),
        ("teacher.path.x=1", "'teacher.path' is a value, not a section"),
    ],
)
def test_bad_keys_name_their_dotted_path(tmp_path, override, message):
    with pytest.raises(StillroomError) as info:
        recipes.validate(recipes.apply_overrides(good(tmp_path), [override]))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_section_and_method(tmp_path):
    data = good(tmp_path)
    data["trian"] = {}
    with pytest.raises(StillroomError, match="'trian' is not accepted.*accepted: description, method"):
        recipes.validate(data)
    data = good(tmp_path)
    data["method"]["name"] = "nope"
    with pytest.raises(StillroomError, match="unknown method 'nope'.*available: .*kd"):
        recipes.validate(data)


def test_overrides_parse_yaml_values_and_create_sections(tmp_path):
    data = recipes.apply_overrides(
        good(tmp_path),
        [
            "train.steps=7",
            "train.betas=[0.8, 0.9]",
            "train.ema=0.99",
            "method.kd_ratio=0.25",
            "export.int8=true",
        ],
    )
    rec = recipes.validate(data)
    assert rec.train.steps == 7 and rec.train.betas == (0.8, 0.9) and rec.train.ema == 0.99
    assert rec.method.kd_ratio == 0.25 and rec.export.int8 is True
    with pytest.raises(StillroomError, match="is not KEY=VALUE"):
        recipes.apply_overrides({}, ["train.steps"])


def test_yaml_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {steps: 3\n")
    with pytest.raises(StillroomError, match="is not valid YAML at line"):
        recipes.load_yaml(bad)
    with pytest.raises(StillroomError, match="no recipe file or named recipe 'missing'"):
        recipes.load_yaml("missing")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(StillroomError, match="must be a mapping"):
        recipes.load_yaml(tmp_path / "list.yaml")


def test_export_to_and_bench_runtimes_are_checked_against_the_registries(tmp_path):
    for override, expected in [
        (
            "export.to=nope",
            "recipe key 'export.to': unknown exporter 'nope' (available: diffusers, onnx, tensorrt, triton;",
        ),
        (
            "bench.runtimes=[torch, nope]",
            "recipe key 'bench.runtimes': unknown runtime 'nope' (available: onnx",
        ),
    ]:
        with pytest.raises(StillroomError) as info:
            recipes.validate(recipes.apply_overrides(good(tmp_path), [override]))
        assert str(info.value).startswith(expected) and "\n" not in str(info.value)


def test_a_plugins_exporter_is_a_valid_export_to(tmp_path):
    import types

    from stillroom.core.hookspecs import hookimpl
    from stillroom.core.host import get_host

    plugin = types.ModuleType("fake_exporter_plugin")
    plugin.register_exporters = hookimpl(lambda register: register("fake", print))
    get_host().register(plugin, "fake-exporter")
    rec = recipes.validate(
        recipes.apply_overrides(good(tmp_path), ["export.to=fake", "export.options={a: 1}"])
    )
    assert rec.export.to == "fake"


def test_export_section_is_the_exporters_keyword_options(tmp_path):
    data = recipes.apply_overrides(
        good(tmp_path), ["export.fused=true", "export.last_logits=true", "export.options={profile: [x]}"]
    )
    options = recipes.validate(data).export.exporter_options()
    assert options["fused"] is True and options["last_logits"] is True and options["profile"] == ["x"]
    assert set(options) == {"fused", "last_logits", "profile"}
    with pytest.raises(StillroomError, match="recipe key 'export.weight_only'"):
        recipes.validate(recipes.apply_overrides(good(tmp_path), ["export.weight_only=int3"]))
