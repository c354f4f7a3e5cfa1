"""Each diffusion method trains end to end on tiny teachers: losses fall, students save and sample."""

from __future__ import annotations

import json

import pytest
import torch

from stillroom.core import recipe as recipes
from stillroom.core.trainer import Trainer
from stillroom.plugins.diffusion.sampler import load_generator
from stillroom.testing import build_caption_folder
from tests.test_diffusion_fixtures import diffusion_recipe


def run(tmp_path, data, name="run"):
    rec = recipes.validate(data)
    student = Trainer(rec, tmp_path / name).fit()
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return student, rows


def falls(values, frac=0.9):
    k = max(2, len(values) // 4)
    head, tail = sum(values[:k]) / k, sum(values[-k:]) / k
    return tail < frac * head, (head, tail)


@pytest.mark.parametrize(
    "method,key",
    [
        ({"name": "progressive", "start_steps": 4, "steps_per_round": 100}, "loss/student"),
        ({"name": "consistency", "ddim_steps": 10, "loss_type": "huber", "target_ema": 0.9}, "loss/student"),
        ({"name": "dmd2", "critic_updates": 2, "gan_weight": 0.1, "critic_lr": 0.01}, "critic_denoise"),
        ({"name": "vsd", "critic": "copy", "critic_lr": 0.01}, "critic_denoise"),
    ],
)
def test_short_run_lowers_the_loss_and_saves_a_loadable_generator(
    tmp_path,
    class_teacher,
    label_folder,
    method,
    key,
):
    data = diffusion_recipe(
        method, class_teacher, {"source": str(label_folder)}, steps=40, lr=3e-3, batch_size=8
    )
    student, rows = run(tmp_path, data)
    ok, (head, tail) = falls([r[key] for r in rows if key in r], 0.9 if key == "loss/student" else 0.96)
    assert ok, f"{method['name']} {key} did not fall: {head:.4f} -> {tail:.4f}"
    card = json.loads((student / "stillroom.json").read_text())
    assert card["sampler"]["conditioning"] == "class" and card["sampler"]["null_class"] == 10
    g = load_generator(student)
    out = g(torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2]))
    assert out.shape == (3, 1, 8, 8) and torch.isfinite(out).all() and out.abs().max() <= 1
    assert (student / "unet" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.parametrize(
    "method",
    [
        {"name": "progressive", "start_steps": 4, "steps_per_round": 1},
        {
            "name": "consistency",
            "ddim_steps": 8,
            "guidance_embed": True,
            "segments": [2, 1],
            "steps_per_stage": 1,
        },
        {"name": "dmd2", "critic_updates": 1},
        {"name": "vsd", "critic": "lora", "lora_rank": 2},
    ],
)
def test_tiny_text_pipeline_trains_two_steps(tmp_path, text_teacher, method):
    folder = build_caption_folder(tmp_path / "captions")
    data = diffusion_recipe(method, text_teacher, {"source": str(folder)}, steps=2, batch_size=2)
    student, rows = run(tmp_path, data)
    assert len([r for r in rows if "loss/student" in r]) == 2
    assert all(torch.isfinite(torch.tensor(r["loss/student"])) for r in rows if "loss/student" in r)
    g = load_generator(student)
    from stillroom.plugins.diffusion.models import encode_prompts, load_text_encoder

    enc, tok = load_text_encoder(student)
    hidden = encode_prompts(enc, tok, ["a red cat", "a blue dog"])
    out = g(torch.randn(2, 4, 8, 8), encoder_hidden_states=hidden)
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()
    if method["name"] == "consistency":
        assert g.sampler["guidance_embed"] and g.unet.config.time_cond_proj_dim == 256


def test_student_init_starts_from_a_distilled_student_and_refuses_mismatches(
    tmp_path,
    class_teacher,
    label_folder,
):
    from safetensors.torch import load_file

    from stillroom.core.errors import StillroomError

    data = {"source": str(label_folder)}
    progressive = {"name": "progressive", "start_steps": 2, "steps_per_round": 3}
    first, _ = run(tmp_path, diffusion_recipe(progressive, class_teacher, data, steps=3, lr=3e-3), "first")
    prediction = json.loads((first / "stillroom.json").read_text())["sampler"]["prediction"]
    dmd2 = {"name": "dmd2", "critic_updates": 1}
    student = {"steps": 1, "init": str(first), "prediction": prediction}
    tuned_recipe = diffusion_recipe(dmd2, class_teacher, data, student, steps=1, lr=1e-12)
    second, _ = run(tmp_path, tuned_recipe, "second")
    weights = "unet/diffusion_pytorch_model.safetensors"
    init, tuned = load_file(first / weights), load_file(second / weights)
    teacher = load_file(class_teacher / weights)
    assert all(torch.allclose(tuned[k], init[k], atol=1e-6) for k in init)  # lr 1e-12: still the init
    assert any(not torch.equal(init[k], teacher[k]) for k in init)  # and the init is not the teacher
    other = "epsilon" if prediction != "epsilon" else "v_prediction"
    with pytest.raises(StillroomError, match=f"predicts {prediction}"):
        run(tmp_path, diffusion_recipe(dmd2, class_teacher, data, {**student, "prediction": other}), "bad")
    with pytest.raises(StillroomError, match="not a generator student"):
        run(tmp_path, diffusion_recipe(dmd2, class_teacher, data, {**student, "init": str(tmp_path)}), "no")
