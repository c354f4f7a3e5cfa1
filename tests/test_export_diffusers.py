"""`stillroom export --to diffusers`: a pipeline folder that diffusers' own loader opens and that
samples exactly as stillroom's few-step sampler does, for plain, AGD (guidance adapters) and Phased DMD
(timestep experts) students, also where stillroom cannot be imported."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stillroom import cli
from stillroom.core import artifact
from stillroom.core import recipe as recipes
from stillroom.core.host import get_host
from stillroom.core.trainer import Trainer
from stillroom.plugins.diffusion.experts import PhasedExperts
from stillroom.plugins.diffusion.sampler import load_generator
from stillroom.testing import build_class_teacher, build_tiny_generator
from tests.conftest import cli_env
from tests.test_diffusion_fixtures import diffusion_recipe

TOLERANCE = 1e-4  # [0, 1] pixel units
LABELS = [0, 3, 5, 9]


def load_pipeline(folder: Path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=str(folder), trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference(
    student: Path, shape: tuple[int, ...], labels: list[int] | None, guidance_scale: float | None = None
) -> np.ndarray:
    """Stillroom's sampler on the noise a seed-0 CPU generator draws, as (n, H, W, C) in [0, 1]."""
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        image = load_generator(student)(
            noise, class_labels=torch.tensor(labels) if labels else None, guidance_scale=guidance_scale
        )
    return ((image + 1) / 2).permute(0, 2, 3, 1).numpy()


def sample(pipe, **kwargs) -> np.ndarray:
    return pipe(
        class_labels=LABELS, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs
    ).images


def unet_calls(pipe, slots: list[str]) -> list[tuple[str, int]]:
    """Records (component, timestep) of every UNet forward in the pipeline's next call."""
    calls = []
    for slot in slots:
        getattr(pipe, slot).register_forward_pre_hook(
            lambda module, args, slot=slot: calls.append((slot, int(args[1][0])))
        )
    return calls


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def perturbed(weights: Path, std: float) -> None:
    """A one-step run leaves the zero-initialised adapter / fresh expert weights near their start:
    move them so that dropping the adapters or an expert shows in the images."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(1)
    save_file(
        {k: v + std * torch.randn(v.shape, generator=g) for k, v in load_file(weights).items()}, weights
    )


def trained(tmp: Path, method: dict, teacher: Path, data: dict, steps: int) -> Path:
    recipe = diffusion_recipe(method, teacher, data, {"steps": 2}, steps=steps)
    return Trainer(recipes.validate(recipe), tmp / "run").fit()


@pytest.fixture(scope="module")
def agd_folder(tmp_path_factory) -> tuple[Path, Path]:
    """(student, exported folder) of a 2-step AGD student (one optimizer step) of a clipping
    (``clip_sample``) DDPM teacher whose schedule ends at abar = 0.35, so that a random teacher's clipped
    x0 is not all +-1 (55% of the pixels are not clamped)."""
    from diffusers import DDPMScheduler

    tmp = tmp_path_factory.mktemp("agd")
    teacher = build_class_teacher(tmp / "teacher")
    DDPMScheduler(beta_end=2e-3, clip_sample=True).save_pretrained(teacher / "scheduler")
    student = trained(tmp, {"name": "agd", "trajectory_steps": 4}, teacher, {}, steps=1)
    perturbed(student / "guidance_adapter" / "adapter.safetensors", 0.1)
    cli.main(["export", str(student), "--to", "diffusers", "--out", str(tmp / "out")])
    return student, tmp / "out"


@pytest.fixture(scope="module")
def phased_folder(tmp_path_factory, class_teacher, label_folder) -> tuple[Path, Path]:
    """(student, exported folder) of a 2-step, two-expert Phased DMD student (one optimizer step per
    phase)."""
    tmp = tmp_path_factory.mktemp("phased")
    method = {"name": "phased_dmd", "phases": 2, "critic_updates": 1}
    student = trained(tmp, method, class_teacher, {"source": str(label_folder)}, steps=2)
    perturbed(student / "unet" / "expert_1" / "diffusion_pytorch_model.safetensors", 0.02)
    out = tmp / "out"
    assert get_host().exporter("diffusers")(student, out).manifest.validation["passed"]
    return student, out


def test_class_student_through_the_registry(tmp_path):
    from diffusers import UNet2DModel

    student = build_tiny_generator(tmp_path / "s", steps=2, size=28)
    card = json.loads((student / "stillroom.json").read_text())
    card["sampler"]["prediction"] = "v_prediction"  # the saved scheduler config still says epsilon
    (student / "stillroom.json").write_text(json.dumps(card))
    out = tmp_path / "out"

    art = get_host().exporter("diffusers")(student, out)

    assert (art.kind, art.manifest.format, art.manifest.graphs) == ("generator", "diffusers", {})
    assert art.manifest.validation["passed"] and art.manifest.validation["max_abs_diff"] <= TOLERANCE
    assert artifact.load(out).manifest.exporter == "stillroom-diffusers"
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "StillroomFewStepPipeline"]
    assert index["unet"] == ["diffusers", "UNet2DModel"]
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"

    pipe = load_pipeline(out)
    images = pipe(
        class_labels=[3, 7],
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert images.shape == (2, 28, 28, 1)
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert ((images > 0) & (images < 1)).mean() > 0.5  # not all clamped: the comparison means something
    expected = reference(student, (2, 1, 28, 28), [3, 7])
    assert np.abs(images - expected).max() <= TOLERANCE
    pipe.scheduler.set_timesteps(2)
    assert [int(t) for t in pipe.scheduler.timesteps] == card["sampler"]["timesteps"]

    unet = UNet2DModel.from_pretrained(out / "unet")
    assert unet.config.sample_size == 28


def test_unconditional_student_through_the_cli(tmp_path):
    student = build_tiny_generator(tmp_path / "s", steps=2, size=28, conditioning=None)
    out = tmp_path / "out"

    cli.main(["export", str(student), "--to", "diffusers", "--out", str(out)])

    assert artifact.load(out).manifest.validation["passed"]
    images = load_pipeline(out)(batch_size=2, generator=torch.Generator().manual_seed(0), output_type="np")
    expected = reference(student, (2, 1, 28, 28), None)
    assert images.images.shape == (2, 28, 28, 1)
    assert np.abs(images.images - expected).max() <= TOLERANCE


def test_text_student_is_refused_in_one_line(tmp_path, capsys):
    student = build_tiny_generator(tmp_path / "s", steps=1, conditioning="text")
    out = tmp_path / "out"
    capsys.readouterr()  # building the student's text encoder prints a progress bar

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", str(student), "--to", "diffusers", "--out", str(out)])

    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "text-conditional students are not supported by the diffusers exporter yet" in err
    assert not out.exists()


def test_agd_student_runs_one_adapted_unet_call_per_step_at_any_guidance_scale(agd_folder):
    from diffusers import UNet2DModel

    student, out = agd_folder
    validation = artifact.load(out).manifest.validation
    assert validation["passed"] and validation["max_abs_diff"] <= TOLERANCE
    index = json.loads((out / "model_index.json").read_text())
    assert index["guidance_adapter"] == ["pipeline", "StillroomGuidanceAdapter"]
    assert index["unet"] == ["diffusers", "UNet2DModel"] and index["guidance_scale"] == 2.0
    assert (
        json.loads((out / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "sample"
    )
    assert (out / "guidance_adapter" / "pipeline.py").read_text() == (out / "pipeline.py").read_text()
    teacher = UNet2DModel.from_pretrained(student / "unet")  # the frozen teacher, untouched
    assert same_weights(teacher, UNet2DModel.from_pretrained(out / "unet"))

    pipe = load_pipeline(out)
    assert type(pipe.guidance_adapter).__name__ == "StillroomGuidanceAdapter"
    calls = unet_calls(pipe, ["unet"])
    images = {w: sample(pipe, guidance_scale=w) for w in (None, 1.0, 3.5)}
    assert calls == [("unet", 999), ("unet", 499)] * 3  # one call per step (CFG would take two)
    shape = (len(LABELS), 1, 8, 8)
    for w in (None, 3.5):  # None: the student's default, the recipe's teacher.guidance 2.0
        expected = reference(student, shape, LABELS, w)
        assert ((expected > 0) & (expected < 1)).mean() > 0.3  # not all clamped: the match means something
        assert np.abs(images[w] - expected).max() <= TOLERANCE
    # the adapters, scaled by (w - 1), are what the match above rests on: w moves the images
    assert np.abs(images[1.0] - images[3.5]).max() > 100 * TOLERANCE


def test_phased_student_switches_expert_by_timestep(phased_folder):
    from diffusers import UNet2DModel

    student, out = phased_folder
    index = json.loads((out / "model_index.json").read_text())
    assert index["unet"] == index["unet_1"] == ["diffusers", "UNet2DModel"] and "unet_2" not in index
    boundaries = json.loads((student / "unet" / "config.json").read_text())["boundaries"]
    assert index["phase_boundaries"] == boundaries == [499]
    experts = PhasedExperts.from_pretrained(student / "unet").experts
    for slot, expert in zip(["unet", "unet_1"], experts, strict=True):
        assert same_weights(expert, UNet2DModel.from_pretrained(out / slot))

    pipe = load_pipeline(out)
    calls = unet_calls(pipe, ["unet", "unet_1"])
    images = sample(pipe)
    assert calls == [("unet", 999), ("unet_1", 499)]  # e(t) = #{i : t <= b_i}
    expected = reference(student, (len(LABELS), 1, 8, 8), LABELS)
    assert ((expected > 0) & (expected < 1)).mean() > 0.3
    assert np.abs(images - expected).max() <= TOLERANCE
    pipe.unet_1 = pipe.unet  # expert 0 alone does not give the student's images
    assert np.abs(sample(pipe) - expected).max() > 100 * TOLERANCE


LOAD_ELSEWHERE = """
import json, sys
sys.modules["stillroom"] = None  # installed in this venv: make any import of it fail
import numpy as np, torch
from diffusers import DiffusionPipeline
images = {}
for name, folder in json.loads(sys.argv[1]).items():
    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)
    seeded = torch.Generator().manual_seed(0)
    images[name] = pipe(class_labels=[0, 3, 5, 9], generator=seeded, output_type="np").images
np.savez(sys.argv[2], **images)
"""


def test_agd_and_phased_folders_load_where_stillroom_cannot_be_imported(agd_folder, phased_folder, tmp_path):
    folders = {"agd": agd_folder, "phased": phased_folder}
    out = tmp_path / "images.npz"
    arg = json.dumps({name: str(folder) for name, (_, folder) in folders.items()})
    proc = subprocess.run(
        [sys.executable, "-I", "-c", LOAD_ELSEWHERE, arg, str(out)],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    images = np.load(out)
    for name, (student, _) in folders.items():
        assert np.abs(images[name] - reference(student, (len(LABELS), 1, 8, 8), LABELS)).max() <= TOLERANCE


def test_more_experts_than_the_pipeline_holds_are_refused_in_one_line(phased_folder, tmp_path, capsys):
    student = tmp_path / "student"
    shutil.copytree(phased_folder[0], student)
    experts = PhasedExperts.from_pretrained(student / "unet").experts
    shutil.rmtree(student / "unet")
    PhasedExperts([experts[0]] * 3 + [experts[1]] * 2, [800, 600, 499, 200]).save_pretrained(student / "unet")
    capsys.readouterr()

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", str(student), "--to", "diffusers", "--out", str(tmp_path / "out")])

    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "5 Phased DMD experts" in err and "holds 4 at most" in err
    assert not (tmp_path / "out").exists()
