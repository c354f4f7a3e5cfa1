"""Loading diffusers teachers (UNet + scheduler [+ text encoder, tokenizer, VAE]) and sampling them.

A teacher spec is a diffusers directory (``unet/`` + ``scheduler/``, optionally ``text_encoder/``,
``tokenizer/``, ``vae/``, as Stable Diffusion checkpoints are laid out), ``embedded:NAME`` or a hub id,
resolved like ``stillroom.data.locate``. Class-conditional teachers are ``UNet2DModel`` with
``num_class_embeds = C + 1``: labels 0..C-1 are the classes and label C is the *null* class used for
classifier-free guidance (the teacher was trained with label dropout to C). Text-conditional teachers
are ``UNet2DConditionModel`` with a CLIP text encoder; the empty prompt is the unconditional input.
A teacher whose ``scheduler/`` is a ``FlowMatchEulerDiscreteScheduler`` is a flow-matching (velocity)
teacher: x_t = (1 - sigma) x0 + sigma eps, the UNet takes 1000 sigma and predicts v = eps - x0
(``prediction == "flow"``); it is sampled with Euler steps instead of DDIM.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stillroom.core.errors import StillroomError
from stillroom.data import locate

log = logging.getLogger(__name__)

FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)


def is_flow(scheduler_config: dict[str, Any]) -> bool:
    """Whether the scheduler config is a flow-matching one (x_t = (1 - sigma) x0 + sigma eps)."""
    return scheduler_config.get("_class_name") in FLOW_SCHEDULERS


@dataclass
class DiffusionTeacher:
    """A loaded teacher and what the methods need to know about its conditioning."""

    unet: torch.nn.Module
    scheduler: Any
    text_encoder: torch.nn.Module | None = None
    tokenizer: Any = None
    vae: torch.nn.Module | None = None
    source: str = ""

    @property
    def conditioning(self) -> str | None:
        if self.text_encoder is not None:
            return "text"
        return "class" if getattr(self.unet.config, "num_class_embeds", None) else None

    @property
    def null_class(self) -> int | None:
        n = getattr(self.unet.config, "num_class_embeds", None)
        return int(n) - 1 if n and self.conditioning == "class" else None

    @property
    def num_classes(self) -> int | None:
        return self.null_class

    @property
    def prediction(self) -> str:
        if is_flow(self.scheduler.config):
            return "flow"
        return str(self.scheduler.config.get("prediction_type", "epsilon"))

    @property
    def image_size(self) -> int:
        size = self.unet.config.sample_size
        return int(size[0] if isinstance(size, list | tuple) else size)

    @property
    def channels(self) -> int:
        return int(self.unet.config.in_channels)


def load_unet(path: str | Path, subfolder: str | None = None):
    """A UNet2DModel or UNet2DConditionModel by the ``_class_name`` of its config."""
    import diffusers

    kwargs = {"subfolder": subfolder} if subfolder else {}
    config = diffusers.UNet2DModel.load_config(path, **kwargs)
    name = config.get("_class_name", "UNet2DModel")
    if name == "PhasedExperts":  # a Phased DMD student: one UNet per phase (plugins/diffusion/experts.py)
        from stillroom.plugins.diffusion.experts import PhasedExperts

        return PhasedExperts.from_pretrained(path, **kwargs)
    if name not in ("UNet2DModel", "UNet2DConditionModel"):
        raise StillroomError(
            f"unet '{path}' is a {name}", "use a UNet2DModel or UNet2DConditionModel teacher"
        )
    return getattr(diffusers, name).from_pretrained(path, **kwargs)


def load_scheduler(where: str | Path):
    """The teacher's scheduler: a FlowMatchEulerDiscreteScheduler as itself, anything else as a
    DDPMScheduler (whose config every DDIM-type scheduler reads)."""
    import diffusers

    config = diffusers.DDPMScheduler.load_config(where, subfolder="scheduler")
    if config.get("_class_name") in FLOW_SCHEDULERS:
        return getattr(diffusers, config["_class_name"]).from_config(config)
    return diffusers.DDPMScheduler.from_config(config)


def load_text_encoder(root: str | Path):
    from transformers import AutoTokenizer, CLIPTextModel

    return (
        CLIPTextModel.from_pretrained(root, subfolder="text_encoder"),
        AutoTokenizer.from_pretrained(root, subfolder="tokenizer"),
    )


def load_teacher(spec: str, role: str = "teacher") -> DiffusionTeacher:
    """Loads a diffusers teacher directory / embedded name / hub id."""
    import diffusers

    where = locate(spec, role)
    local = Path(where)
    try:
        unet = load_unet(where, "unet")
        scheduler = load_scheduler(where)
        encoder = tokenizer = vae = None
        if type(unet).__name__ == "UNet2DConditionModel" and (
            not local.is_dir() or (local / "text_encoder").is_dir()
        ):
            encoder, tokenizer = load_text_encoder(where)
        if (local / "vae").is_dir() or (not local.is_dir() and type(unet).__name__ == "UNet2DConditionModel"):
            vae = diffusers.AutoencoderKL.from_pretrained(where, subfolder="vae")
    except (OSError, ValueError) as err:
        raise StillroomError(
            f"could not load {role} '{spec}': {' '.join(str(err).split())[:200]}",
            "give a diffusers directory with unet/ and scheduler/ (and text_encoder/, tokenizer/ for text)",
        ) from err
    if type(unet).__name__ == "UNet2DConditionModel" and encoder is None:
        raise StillroomError(
            f"{role} '{spec}' has a text-conditional UNet but no text_encoder/",
            "add text_encoder/ and tokenizer/ to the directory",
        )
    for module in (unet, encoder, vae):
        if module is not None:
            module.eval().requires_grad_(False)
    return DiffusionTeacher(unet, scheduler, encoder, tokenizer, vae, spec)


@torch.no_grad()
def encode_prompts(text_encoder, tokenizer, prompts: list[str]) -> torch.Tensor:
    """CLIP last hidden states [B, L, D] of ``prompts`` padded to the tokenizer's max length."""
    device = next(text_encoder.parameters()).device
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    return text_encoder(ids)[0]


def unet_kwargs(cond: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of a UNet call for a conditioning dict {class_labels | encoder_hidden_states}."""
    return {k: v for k, v in cond.items() if v is not None}


def cfg_output(
    unet,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: dict[str, Any],
    uncond: dict[str, Any],
    scale: float | torch.Tensor | None,
) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): out = u + w (c - u); w = None or 1: conditional only."""
    if scale is None or (not torch.is_tensor(scale) and scale == 1.0):
        return unet(x, t, **unet_kwargs(cond)).sample
    both = {k: torch.cat([cond[k], uncond[k]]) for k in cond if cond[k] is not None}
    out = unet(torch.cat([x, x]), torch.cat([t, t]), **both).sample
    c, u = out.chunk(2)
    if torch.is_tensor(scale):
        scale = scale.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return u + scale * (c - u)


@torch.no_grad()
def teacher_sample(
    teacher: DiffusionTeacher,
    noise: torch.Tensor,
    cond: dict[str, Any],
    uncond: dict[str, Any],
    steps: int,
    guidance: float | None = None,
    decode: bool = True,
) -> torch.Tensor:
    """Reference samples of the teacher with diffusers' DDIMScheduler (eta = 0, trailing spacing) and CFG;
    a flow teacher with its own FlowMatchEulerDiscreteScheduler (Euler, x <- x + (sigma' - sigma) v).

    ``cond``/``uncond`` are UNet keyword dicts (``class_labels`` or ``encoder_hidden_states``).
    Returns images in [-1, 1] (latents are decoded with the VAE when ``decode``).
    """
    from diffusers import DDIMScheduler

    if teacher.prediction == "flow":
        sched = type(teacher.scheduler).from_config(teacher.scheduler.config)
        sched.set_timesteps(steps, device=noise.device)
        x = noise
        for t in sched.timesteps:
            out = cfg_output(teacher.unet, x, t.expand(x.shape[0]), cond, uncond, guidance)
            x = sched.step(out, t, x).prev_sample
        return _decoded(teacher, x, decode)

    # x0 clipping follows the teacher's own config (pixel DDPMs set clip_sample): near zero SNR an
    # epsilon teacher's x0 = (x - sigma eps) / alpha is unusable without it, and eps is re-derived from
    # the clipped x0 (GLIDE; use_clipped_model_output) or many-step sampling drifts. Latents: no clip.
    clip = bool(teacher.scheduler.config.get("clip_sample")) and teacher.vae is None
    sched = DDIMScheduler.from_config(
        teacher.scheduler.config, timestep_spacing="trailing", clip_sample=clip, set_alpha_to_one=True
    )
    sched.set_timesteps(steps, device=noise.device)
    x = noise
    for t in sched.timesteps:
        tt = t.expand(x.shape[0]).to(noise.device)
        out = cfg_output(teacher.unet, x, tt, cond, uncond, guidance)
        x = sched.step(out, t, x, eta=0.0, use_clipped_model_output=clip).prev_sample
    return _decoded(teacher, x, decode)


def _decoded(teacher: DiffusionTeacher, x: torch.Tensor, decode: bool) -> torch.Tensor:
    if decode and teacher.vae is not None:
        x = teacher.vae.decode(x / teacher.vae.config.scaling_factor).sample
    return x.clamp(-1.0, 1.0)


def class_cond(labels: torch.Tensor, null_class: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(cond, uncond) UNet kwargs for class labels with the null class as the unconditional input."""
    return {"class_labels": labels}, {"class_labels": torch.full_like(labels, null_class)}
