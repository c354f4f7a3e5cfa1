"""`stillroom export --to diffusers`: a pipeline folder that diffusers' own loader opens and that
samples exactly as stillroom's few-step sampler does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from stillroom import cli
from stillroom.core import artifact
from stillroom.core.host import get_host
from stillroom.plugins.diffusion.sampler import load_generator
from stillroom.testing import build_tiny_generator

TOLERANCE = 1e-4  # [0, 1] pixel units


def load_pipeline(folder: Path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=str(folder), trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference(student: Path, shape: tuple[int, ...], labels: list[int] | None) -> np.ndarray:
    """Stillroom's sampler on the noise a seed-0 CPU generator draws, as (n, H, W, C) in [0, 1]."""
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        image = load_generator(student)(noise, class_labels=torch.tensor(labels) if labels else None)
    return ((image + 1) / 2).permute(0, 2, 3, 1).numpy()


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
