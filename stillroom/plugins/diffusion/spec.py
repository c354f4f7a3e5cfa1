"""The generator artifact's ``spec``: the sampler the graph unrolls, typed.

It is the student's ``stillroom.json`` ``"sampler"`` (see ``stillroom.plugins.diffusion.sampler``
for each field's meaning), as the exporter re-targeted it, checked field by field, plus the
conditioning the graph takes. Runtimes read image shape, classes, guidance and steps from it and
nothing else, so an artifact never needs the student directory it came from.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from stillroom.core.artifact import Manifest, typed_spec

TASKS = {
    "class": "class-conditional-image-generation",
    "text": "text-to-image",
    "none": "unconditional-image-generation",
}


class Boundary(BaseModel):
    """Consistency boundary conditions (LCM / Hyper-SD segments)."""

    model_config = ConfigDict(extra="forbid")
    sigma_data: float
    timestep_scaling: float
    ends: list[int]


class Handover(BaseModel):
    """Hybrid sampling: J teacher DDIM steps down to ``handover``, then the student (Gandikota & Bau 2025)."""

    model_config = ConfigDict(extra="forbid")
    teacher: str
    timesteps: list[int]
    handover: int
    guidance: float | None = None
    prediction: str
    clip_sample: float | None = None


class SamplerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int  # network evaluations of the student
    timesteps: list[int]  # t_1 > ... > t_K
    prediction: Literal["epsilon", "sample", "v_prediction", "flow"]
    guidance: float | None = None  # CFG scale at sampling time (null: baked in)
    guidance_embed: bool = False
    boundary: Boundary | None = None
    conditioning: Literal["class", "text", "none"] = "none"
    num_classes: int | None = None
    null_class: int | None = None
    class_names: list[str] | None = None
    image_size: int | list[int]
    channels: int
    latent: bool = False
    hybrid: Handover | None = None

    @property
    def task(self) -> str:
        return TASKS[self.conditioning]


def from_sampler(sampler: dict[str, Any], conditioning: str | None) -> SamplerSpec:
    """The spec of a generator's ``sampler`` dict, whose graph takes ``conditioning``."""
    return SamplerSpec.model_validate({**sampler, "conditioning": conditioning or "none"})


def spec_of(manifest: Manifest) -> SamplerSpec:
    return typed_spec(manifest, SamplerSpec)
