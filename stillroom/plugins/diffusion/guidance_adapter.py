"""Guidance adapters (AGD: Jensen & Sadat 2025, "Efficient Distillation of Classifier-Free Guidance using
Adapters"): a frozen diffusion UNet plus small trainable offset adapters conditioned on the guidance
scale w, so that ONE forward pass approximates the classifier-free-guided output

    out_w(x, t, c) = out(x, t, null) + w (out(x, t, c) - out(x, t, null))        (2 evaluations)

A student directory holding them is the teacher's untouched ``unet/`` plus ``guidance_adapter/``
(``config.json`` + ``adapter.safetensors``, ``save_adapters``); ``sampler.load_generator`` wraps the
one with the other.

Adapters (after AGD's "offset adapters") sit on the outputs of the UNet's mid block and up blocks. With
h a block's output (C channels), e_w the sinusoidal embedding of w (LCM's ``guidance_embedding``, which
the sampler feeds as ``timestep_cond``) and tau the UNet's own time embedding,

    g = SiLU(A e_w + B tau),   h <- h + (w - 1) U(SiLU(D h + F g))

with D a 1x1 conv C -> r, F a linear map to r, U a 3x3 conv r -> C initialised to zero. The (w - 1)
factor makes the adapted UNet equal to the frozen conditional UNet at w = 1, which is CFG at w = 1
exactly (our choice of AGD's residual formulation: the adapters learn only what guidance adds); w - 1 is
read back from e_w's lowest frequency, sin(0.1 (w - 1)), so w must lie in (1 - 5 pi, 1 + 5 pi).
Sampling follows the teacher's own DDIM rule: with ``clip_sample`` r the adapted UNet outputs the clipped
x0 = clamp((x - sigma_t eps_w) / alpha_t, -r, r) (the sampler's ``sample`` prediction), as diffusers'
DDIM step clips the teacher's.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from stillroom.core.errors import StillroomError
from stillroom.core.fsio import write_text

WEIGHTS, CONFIG = "adapter.safetensors", "config.json"


class Output:
    def __init__(self, sample: torch.Tensor) -> None:
        self.sample = sample


class OffsetAdapter(nn.Module):
    """h -> U(SiLU(D h + F g)) for one block output of ``channels`` channels (U zero-initialised)."""

    def __init__(self, channels: int, rank: int, hidden: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(channels, rank, 1)
        self.film = nn.Linear(hidden, rank)
        self.up = nn.Conv2d(rank, channels, 3, padding=1)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return self.up(F.silu(self.down(h) + self.film(g)[:, :, None, None]))


def guidance_minus_one(embed: torch.Tensor) -> torch.Tensor:
    """w - 1 from LCM's guidance embedding: its lowest frequency is 1e-4, so the sine at index
    dim/2 - 1 is sin(0.1 (w - 1)), invertible for |w - 1| < 5 pi."""
    half = embed.shape[1] // 2
    lowest = math.exp(-math.log(10000.0))
    return torch.asin(embed[:, half - 1].float()) / (1000.0 * lowest)


def adapter_sites(unet: nn.Module) -> list[tuple[str, int]]:
    """(module name, output channels) of the mid block and every up block."""
    outs = list(unet.config.block_out_channels)
    ups = list(reversed(outs))
    return [("mid_block", outs[-1])] + [(f"up_blocks.{i}", ups[i]) for i in range(len(ups))]


class GuidanceAdaptedUNet(nn.Module):
    """The frozen ``base`` UNet with guidance adapters (see the module docstring)."""

    def __init__(
        self,
        base: nn.Module,
        abar: torch.Tensor,
        rank: int = 8,
        embed_dim: int = 32,
        hidden: int = 64,
        clip_sample: float | None = None,
        prediction: str = "epsilon",
    ) -> None:
        super().__init__()
        if clip_sample is not None and prediction != "epsilon":
            raise StillroomError(
                f"guidance adapters clip x0 only for epsilon teachers, this one predicts {prediction}",
                "use an epsilon-prediction teacher or one whose scheduler does not clip_sample",
            )
        self.base = base.requires_grad_(False)
        self.settings = {
            "rank": rank,
            "embed_dim": embed_dim,
            "hidden": hidden,
            "clip_sample": clip_sample,
            "prediction": prediction,
        }
        from diffusers.configuration_utils import FrozenDict

        self.config = FrozenDict({**base.config, "time_cond_proj_dim": embed_dim})
        self.register_buffer("abar", abar.detach().float().clone(), persistent=False)
        temb = int(base.time_embedding.linear_2.out_features)
        self.w_proj = nn.Linear(embed_dim, hidden)
        self.t_proj = nn.Linear(temb, hidden)
        self.sites = adapter_sites(base)
        self.adapters = nn.ModuleList(OffsetAdapter(c, rank, hidden) for _, c in self.sites)
        self._state: dict[str, torch.Tensor] = {}
        base.time_embedding.register_forward_hook(self._condition)
        for i, (name, _) in enumerate(self.sites):  # bound-method partials: a deepcopy (EMA) re-binds them
            base.get_submodule(name).register_forward_hook(functools.partial(self._offset, i))

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    def _condition(self, module, args, output):
        """On the base UNet's time embedding tau: g = SiLU(A e_w + B tau) for this forward pass."""
        if "embed" in self._state:
            self._state["g"] = F.silu(
                self.w_proj(self._state["embed"].to(output.dtype)) + self.t_proj(output)
            )

    def _offset(self, i: int, module, args, output):
        """On block ``i``'s output h: h + (w - 1) adapter_i(h, g); the plain output outside ``guided``."""
        if "g" not in self._state:
            return output
        h = output[0] if isinstance(output, tuple) else output
        h = h + self._state["w1"].to(h.dtype).view(-1, 1, 1, 1) * self.adapters[i](h, self._state["g"])
        return (h, *output[1:]) if isinstance(output, tuple) else h

    def guided(self, x: torch.Tensor, t: torch.Tensor, embed: torch.Tensor, **cond: Any) -> torch.Tensor:
        """The adapted UNet's raw output (the base UNet's parametrisation) at guidance embedding ``embed``."""
        self._state = {"w1": guidance_minus_one(embed), "embed": embed}
        try:
            return self.base(x, t, **cond).sample
        finally:
            self._state = {}

    def forward(self, x, t, class_labels=None, encoder_hidden_states=None, timestep_cond=None) -> Output:
        cond = {
            k: v
            for k, v in (("class_labels", class_labels), ("encoder_hidden_states", encoder_hidden_states))
            if v is not None
        }
        if timestep_cond is None:
            raise StillroomError(
                "the guidance-adapted UNet needs the guidance embedding", "pass timestep_cond"
            )
        out = self.guided(x, t, timestep_cond, **cond)
        r = self.settings["clip_sample"]
        if r is None:
            return Output(out)
        ab = self.abar[t.expand(x.shape[0])].view(-1, 1, 1, 1)
        return Output(((x - (1 - ab).sqrt() * out) / ab.sqrt()).clamp(-r, r))  # epsilon (checked in __init__)

    @property
    def sampler_prediction(self) -> str:
        """What ``forward`` outputs, as the sampler's ``prediction`` field."""
        return self.settings["prediction"] if self.settings["clip_sample"] is None else "sample"

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The adapters' weights (everything but the frozen base UNet), on the CPU."""
        return {
            k: v.detach().cpu().contiguous()
            for k, v in self.state_dict().items()
            if not k.startswith("base.")
        }

    def save_adapters(self, folder: Path) -> None:
        """``config.json`` and ``adapter.safetensors`` of the adapters (the base UNet is saved as it is)."""
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.adapter_state(), folder / WEIGHTS)
        write_text(folder / CONFIG, json.dumps(self.settings, indent=2))


def load_adapted(base: nn.Module, folder: Path, abar: torch.Tensor) -> GuidanceAdaptedUNet:
    """The base UNet wrapped with the adapters ``GuidanceAdaptedUNet.save_adapters`` wrote to ``folder``."""
    from safetensors.torch import load_file

    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise StillroomError(
            f"'{folder}' lacks {CONFIG} or {WEIGHTS}", "re-save the student (stillroom run with method agd)"
        )
    model = GuidanceAdaptedUNet(base, abar, **json.loads((folder / CONFIG).read_text(encoding="utf-8")))
    missing, unexpected = model.load_state_dict(load_file(folder / WEIGHTS), strict=False)
    if unexpected or any(not k.startswith("base.") for k in missing):
        raise StillroomError(f"'{folder}' does not fit this UNet", "re-save the student from its run")
    return model
