"""Generator student -> a diffusers pipeline folder that diffusers' own loader opens.

    D/model_index.json   {"_class_name": ["pipeline", "StillroomFewStepPipeline"], "unet": [...],
                          "scheduler": [...], + the pipeline's sampler settings (diffusers_pipeline.py)}
    D/unet/              the student's UNet2DModel (``UNet2DModel.from_pretrained(D / "unet")``); an AGD
                         student's frozen teacher UNet; a Phased DMD student's expert 0
    D/unet_1/ ...        a Phased DMD student's experts 1..E-1 (E <= 4), their phase boundaries in
                         model_index.json's ``phase_boundaries``
    D/guidance_adapter/  an AGD student's adapters as the pipeline's ``StillroomGuidanceAdapter``
                         (config.json, diffusion_pytorch_model.safetensors, and pipeline.py: diffusers
                         imports a custom component's class from the component's own folder)
    D/scheduler/         DDIMScheduler config: the student's noise schedule, its real ``prediction_type``
                         (``stillroom.json``'s ``sampler.prediction``; the saved scheduler may say epsilon)
                         and trailing spacing, whose grid for K steps is the distilled timesteps
                         (a flow student's: its FlowMatchEulerDiscreteScheduler config, prediction "flow")
    D/pipeline.py        the text of ``diffusers_pipeline.py``
    D/manifest.json      written last, after validation

Users load it with ``DiffusionPipeline.from_pretrained(D, custom_pipeline=str(D), trust_remote_code=True)``.
Before the manifest is written the folder is loaded exactly that way, in this process, and its images
for a fixed seed are compared with stillroom's own sampler (``load_generator``) fed the same noise.

Only what the pipeline template reproduces is exported: class-conditional or unconditional pixel-space
UNet2DModel students, with or without sampling-time classifier-free guidance or a consistency boundary,
including AGD students (guidance adapters, w an argument) and Phased DMD students of up to 4 experts.
Text, latent, hybrid and LCM guidance-embedded students are refused up front rather than exported
half-working.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from stillroom.core import artifact, provenance
from stillroom.core.errors import StillroomError
from stillroom.core.fsio import atomic_dir
from stillroom.core.source import detect
from stillroom.plugins.diffusion import diffusers_pipeline
from stillroom.plugins.diffusion import spec as sampler_spec
from stillroom.plugins.diffusion.experts import PhasedExperts
from stillroom.plugins.diffusion.guidance_adapter import GuidanceAdaptedUNet
from stillroom.plugins.diffusion.sampler import ddim_timesteps, is_flow, load_generator

log = logging.getLogger(__name__)

PIPELINE_CLASS = diffusers_pipeline.StillroomFewStepPipeline.__name__
ADAPTER_CLASS = diffusers_pipeline.StillroomGuidanceAdapter.__name__
SLOTS = diffusers_pipeline.EXPERT_SLOTS
TOLERANCE = 1e-4  # max abs difference in [0, 1] pixel units; both sides run the same float32 arithmetic
SEED = 0


def export_diffusers(src: str | Path, out: str | Path, *, steps: int | None = None, **_: Any):
    """Writes ``out`` as a validated diffusers pipeline folder for the generator student behind ``src``.

    ``steps`` re-targets the default ``num_inference_steps`` to the trailing grid for that K, as
    ``stillroom export --to onnx --steps`` does.
    """
    import diffusers

    source = detect(src)
    if source.kind != "generator":
        raise StillroomError(
            f"the diffusers exporter takes a generator student; '{src}' holds a {source.kind}",
            "use `--to onnx` for it, or point at the student of a diffusion distill run",
        )
    student = Path(source.model_dir)
    sampler = json.loads((student / "stillroom.json").read_text(encoding="utf-8"))["sampler"]
    _check_supported(student, sampler)
    generator = load_generator(student, steps=steps)
    sampler = generator.sampler
    unets, phase_boundaries, adapted = _networks(generator.unet, student)
    scheduler_config = dict(diffusers.DDIMScheduler.load_config(student / "scheduler"))
    pipeline_config = {**_pipeline_config(sampler, scheduler_config), "phase_boundaries": phase_boundaries}

    out = Path(out)
    with atomic_dir(out) as tmp:
        components = {}
        for slot, unet in zip(SLOTS, unets, strict=False):
            unet.save_pretrained(tmp / slot)
            components[slot] = ["diffusers", "UNet2DModel"]
        if adapted is not None:
            _save_adapter(adapted, tmp / "guidance_adapter")
            components["guidance_adapter"] = ["pipeline", ADAPTER_CLASS]
        if is_flow(scheduler_config):  # the pipeline reads a flow student's grid and v from its class
            scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        else:
            scheduler = diffusers.DDIMScheduler.from_config(
                scheduler_config, prediction_type=sampler["prediction"], timestep_spacing="trailing"
            )
        scheduler.save_pretrained(tmp / "scheduler")
        shutil.copyfile(diffusers_pipeline.__file__, tmp / "pipeline.py")
        model_index = {
            "_class_name": ["pipeline", PIPELINE_CLASS],
            "_diffusers_version": diffusers.__version__,
            **pipeline_config,
            **components,
            "scheduler": ["diffusers", type(scheduler).__name__],
        }
        (tmp / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n", encoding="utf-8")
        validation = validate(tmp, generator, sampler)
        if not validation["passed"]:
            raise StillroomError(
                "the diffusers pipeline differs from stillroom's sampler by "
                f"{validation['max_abs_diff']:.3g} (tolerance {TOLERANCE:g}); no artifact was written",
                "report this with the student directory; `--to onnx` exports the same student",
            )
        spec = sampler_spec.from_sampler(sampler, sampler.get("conditioning"))
        manifest = artifact.Manifest(
            kind="generator",
            family="diffusion",
            task=spec.task,
            format="diffusers",
            exporter="stillroom-diffusers",
            graphs={},
            spec=spec.model_dump(mode="json"),
            provenance=provenance.record({**source.info, "steps_requested": steps}, student),
            validation=validation,
            extra={"pipeline_class": PIPELINE_CLASS},
        )
        artifact.write_manifest(tmp, manifest)
    log.info("diffusers pipeline written to %s (max abs diff %.3g)", out, validation["max_abs_diff"])
    return artifact.load(out)


def _check_supported(student: Path, sampler: dict[str, Any]) -> None:
    """Refuses, in one line, a student the pipeline template would not reproduce."""
    unsupported = [
        (sampler.get("conditioning") == "text", "text-conditional"),
        (bool(sampler.get("latent")), "latent"),
        (bool(sampler.get("hybrid")), "hybrid (teacher + student)"),
        (
            bool(sampler.get("guidance_embed")) and not (student / "guidance_adapter").is_dir(),
            "guidance-embedded (LCM w-embedding)",
        ),
    ]
    for hit, what in unsupported:
        if hit:
            raise StillroomError(
                f"{what} students are not supported by the diffusers exporter yet ('{student}')",
                "export it with `--to onnx`; --to diffusers takes class-conditional or unconditional "
                "pixel-space students",
            )
    if sampler.get("guidance") is not None and sampler.get("conditioning") != "class":
        raise StillroomError(
            "sampling-time guidance without class conditioning is not supported by the diffusers exporter",
            "export it with `--to onnx`",
        )


def _networks(net: torch.nn.Module, student: Path):
    """(the UNets in slot order, Phased DMD's phase boundaries or None, AGD's adapted UNet or None) of the
    loaded student's network, refused in one line where the pipeline has no place for it."""
    unets, boundaries, adapted = [net], None, None
    if isinstance(net, GuidanceAdaptedUNet):
        unets, adapted = [net.base], net
    elif isinstance(net, PhasedExperts):
        unets, boundaries = list(net.experts), list(net.boundaries)
    if len(unets) > len(SLOTS):
        raise StillroomError(
            f"'{student}' has {len(unets)} Phased DMD experts; "
            f"the diffusers pipeline holds {len(SLOTS)} at most",
            f"export it with `--to onnx`, or train it with method.phases <= {len(SLOTS)}",
        )
    other = sorted({type(unet).__name__ for unet in unets} - {"UNet2DModel"})
    if other:
        raise StillroomError(
            f"the student's UNet is a {other[0]}; the diffusers exporter supports UNet2DModel only",
            "export it with `--to onnx`",
        )
    return unets, boundaries, adapted


def _save_adapter(adapted: GuidanceAdaptedUNet, folder: Path) -> None:
    """AGD's adapters as the pipeline's ``StillroomGuidanceAdapter`` (same weight names), with the
    pipeline file beside them, where diffusers looks for a custom component's class."""
    settings = adapted.settings
    adapter = diffusers_pipeline.StillroomGuidanceAdapter(
        sites=[[name, channels] for name, channels in adapted.sites],
        rank=settings["rank"],
        embed_dim=settings["embed_dim"],
        hidden=settings["hidden"],
        time_embed_dim=adapted.t_proj.in_features,
        clip_sample=settings["clip_sample"],
    )
    adapter.load_state_dict(adapted.adapter_state())
    adapter.save_pretrained(folder)
    shutil.copyfile(diffusers_pipeline.__file__, folder / "pipeline.py")


def _pipeline_config(sampler: dict[str, Any], scheduler_config: dict[str, Any]) -> dict[str, Any]:
    """The pipeline's own settings (model_index.json), checked to rebuild exactly ``sampler``'s schedule.

    The pipeline derives its timesteps from the scheduler's trailing grid and a consistency student's
    segment ends from that grid; a student whose schedule those rules do not give is refused.
    """
    timesteps = [int(t) for t in sampler["timesteps"]]
    if timesteps != ddim_timesteps(scheduler_config, len(timesteps)):
        raise StillroomError(
            f"the student's timesteps {timesteps} are not the trailing DDIM grid, which the diffusers "
            "exporter supports only",
            "export it with `--to onnx`",
        )
    boundary = None
    if sampler.get("boundary"):
        spec = sampler["boundary"]
        ends = [int(e) for e in spec["ends"]]
        segmented = set(ends) != {0}
        if ends != (timesteps[1:] + [0] if segmented else [0] * len(timesteps)):
            raise StillroomError(
                f"consistency segment ends {ends} are neither the next timesteps nor all 0, which the "
                "diffusers exporter does not support",
                "export it with `--to onnx`",
            )
        boundary = {
            "sigma_data": float(spec["sigma_data"]),
            "timestep_scaling": float(spec["timestep_scaling"]),
            "segmented": segmented,
        }
    return {
        "num_inference_steps": len(timesteps),
        "conditioning": sampler.get("conditioning"),
        "guidance_scale": sampler.get("guidance"),
        "null_class": sampler.get("null_class"),
        "boundary": boundary,
    }


def validation_inputs(sampler: dict[str, Any]) -> tuple[list[int] | None, int]:
    """(class_labels, batch size) of the validation call: up to 4 distinct classes, or 2 unconditional."""
    if sampler.get("conditioning") == "class":
        labels = list(range(min(4, int(sampler["num_classes"]))))
        return labels, len(labels)
    return None, 2


def validate(folder: Path, generator: torch.nn.Module, sampler: dict[str, Any]) -> dict[str, Any]:
    """Loads ``folder`` with diffusers' own loader and compares a seeded batch with ``generator``.

    The pipeline draws its noise as ``torch.randn(shape, generator=torch.Generator().manual_seed(SEED))``;
    the reference redraws that noise and runs stillroom's sampler on it, mapped to [0, 1].
    """
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=str(folder), trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    labels, batch = validation_inputs(sampler)
    kwargs = {"class_labels": labels} if labels is not None else {"batch_size": batch}
    images = pipe(**kwargs, generator=torch.Generator().manual_seed(SEED), output_type="np").images
    shape = (batch, int(sampler["channels"]), int(sampler["image_size"]), int(sampler["image_size"]))
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        ref = generator(noise, class_labels=torch.tensor(labels) if labels is not None else None)
    expected = ((ref + 1.0) / 2.0).permute(0, 2, 3, 1).numpy()
    if images.shape != expected.shape:
        raise StillroomError(
            f"the diffusers pipeline made images of shape {images.shape}, "
            f"stillroom's sampler {expected.shape}",
            "the student's unet config and stillroom.json disagree on the image size; re-save the student",
        )
    diff = float(abs(images - expected).max())
    return {
        "max_abs_diff": diff,
        "tolerance": TOLERANCE,
        "passed": diff <= TOLERANCE,
        "units": "[0, 1] pixels",
        "seed": SEED,
        "samples": batch,
        "steps": int(sampler["steps"]),
        "loader": "DiffusionPipeline.from_pretrained(custom_pipeline, trust_remote_code=True)",
    }
