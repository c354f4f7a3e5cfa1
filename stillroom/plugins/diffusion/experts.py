"""A mixture of timestep experts that is one UNet to every caller (Phased DMD's few-step MoE student).

``PhasedExperts`` holds E UNets of one architecture and the timesteps where phases 2..E begin,
``boundaries = [b_1 > ... > b_{E-1}]``; expert e answers every t with

    e(t) = #{i : t <= b_i}        (t > b_1: expert 0, ..., t <= b_{E-1}: expert E-1)

It is called like the UNet it replaces, ``experts(x, t, class_labels=..., ...).sample``, so the
few-step sampler, training, evaluation and export need no change. Eagerly each sample goes to its own
expert (a batch may mix phases). Under ``torch.export`` the choice is a tensor op: the experts'
weights are stacked and ``index_select``-ed by e(t) of the batch's first timestep, then one UNet runs
with them (``torch.func.functional_call``); the exported graph is one Gather per weight and a single
UNet per sampler step, and as the sampler's timesteps are constants ONNX Runtime folds the Gathers at
session creation. (``torch.cond`` would give an ONNX ``If``, but its branches are traced by dynamo,
which cannot trace diffusers' attention; a data-dependent ``int(t)`` cannot be exported at all.) The
sampler feeds every sample of a batch the same timestep, which is what the export assumes.

Saved as ``config.json`` (``_class_name: PhasedExperts``, the boundaries, the expert count) plus one
diffusers UNet directory per expert, ``expert_0/``, ``expert_1/``, ...
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from stillroom.core.fsio import write_json

CLASS_NAME = "PhasedExperts"


class PhasedExperts(nn.Module):
    def __init__(self, experts: list[nn.Module], boundaries: list[int]) -> None:
        super().__init__()
        if len(boundaries) != len(experts) - 1 or any(
            b >= a for a, b in zip(boundaries, boundaries[1:], strict=False)
        ):
            raise ValueError(f"{len(experts)} experts need {len(experts) - 1} decreasing boundaries")
        self.experts = nn.ModuleList(experts)
        self.boundaries = [int(b) for b in boundaries]
        self.register_buffer("bounds", torch.tensor(self.boundaries, dtype=torch.long), persistent=False)

    @property
    def config(self):
        """The experts' UNet config (shape, conditioning), as callers read a UNet's."""
        return self.experts[0].config

    def expert_index(self, timestep: torch.Tensor) -> torch.Tensor:
        """e(t) per element of ``timestep`` (long)."""
        t = timestep.reshape(-1, 1).to(self.bounds.device)
        return (t <= self.bounds.view(1, -1)).sum(dim=1)

    def forward(self, sample: torch.Tensor, timestep, **kwargs):
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])
        if torch.compiler.is_exporting():
            return SimpleNamespace(sample=self._gathered(sample, t, kwargs))
        index = self.expert_index(t)
        if bool((index == index[0]).all()):
            return self.experts[int(index[0])](sample, t, **kwargs)
        out = None
        for e in index.unique().tolist():
            rows = (index == e).nonzero().squeeze(1)
            part = self.experts[e](sample[rows], t[rows], **_rows(kwargs, rows)).sample
            out = part.new_zeros((len(t), *part.shape[1:])) if out is None else out
            out = out.index_copy(0, rows, part)
        return SimpleNamespace(sample=out)

    def _gathered(self, sample, t, kwargs):
        index = self.expert_index(t[:1])
        params = {}
        for name, first in self.experts[0].named_parameters():
            stacked = torch.stack([first] + [e.get_parameter(name) for e in self.experts[1:]])
            params[name] = stacked.index_select(0, index).squeeze(0)
        return torch.func.functional_call(self.experts[0], params, (sample, t), kwargs).sample

    def save_pretrained(self, path, safe_serialization: bool = True) -> None:
        root = Path(path)
        for i, expert in enumerate(self.experts):
            expert.save_pretrained(root / f"expert_{i}", safe_serialization=safe_serialization)
        config = {"_class_name": CLASS_NAME, "experts": len(self.experts), "boundaries": self.boundaries}
        write_json(root / "config.json", config)

    @classmethod
    def from_pretrained(cls, path, subfolder: str | None = None) -> PhasedExperts:
        import diffusers

        root = Path(path) / (subfolder or "")
        config = json.loads((root / "config.json").read_text())
        experts = []
        for i in range(int(config["experts"])):  # plain diffusers UNets, by their config's class name
            folder = root / f"expert_{i}"
            name = diffusers.UNet2DModel.load_config(folder).get("_class_name", "UNet2DModel")
            experts.append(getattr(diffusers, name).from_pretrained(folder))
        return cls(experts, config["boundaries"])


def _rows(kwargs: dict, rows: torch.Tensor) -> dict:
    return {k: v[rows] if torch.is_tensor(v) and v.dim() > 0 else v for k, v in kwargs.items()}
