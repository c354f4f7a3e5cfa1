"""What the data-free diffusion methods (``boot``, ``tbcm``, ``agd``) share: conditions without images,
and the teacher's own classifier-free-guided DDIM trajectories started at pure noise.

``DataFreeMethod.dataset`` never opens ``data.source`` for a class-conditional teacher: an item is
``(None, class)`` with the classes balanced (the trainer's index stream shuffles them); a text teacher
reads only a prompt file. ``TeacherTrajectories`` keeps one teacher trajectory per batch slot and moves
each one DDIM step per training step, so a method trains on the states the guided teacher visits when it
samples (no image is ever noised):

    x_{t_0} = z ~ N(0, I),   x_{t_{k+1}} = alpha_{t_{k+1}} x0_w(x_{t_k}) + sigma_{t_{k+1}} eps_w(x_{t_k})

with (x0_w, eps_w) the teacher's CFG prediction at scale w, x0 clipped as its scheduler clips it
(``DiffusionMethod.x0_eps``). A slot that reaches the clean end restarts from fresh noise with the
batch's condition at that slot (and a fresh w); at the first call each slot is advanced a random number
of steps so the batch covers the whole grid at every step.
"""

from __future__ import annotations

from typing import Any

import torch

from stillroom.core.errors import StillroomError
from stillroom.plugins.diffusion import sampler as gen
from stillroom.plugins.diffusion.base import DiffusionMethod


class ClassLabels(torch.utils.data.Dataset):
    """``(None, i mod C)``: balanced class conditions, no images."""

    def __init__(self, num_classes: int, per_class: int = 100) -> None:
        self.num_classes, self.size = num_classes, num_classes * per_class

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[None, int]:
        return None, i % self.num_classes


class DataFreeMethod(DiffusionMethod):
    """A diffusion method that reads no images: conditions only (see the module docstring)."""

    needs_images = False

    def dataset(self):
        kind = self.teacher.conditioning
        if kind == "class":
            return ClassLabels(int(self.teacher.num_classes))
        if kind == "text" and str(self.recipe.data.source).endswith(".txt"):
            return super().dataset()
        raise StillroomError(
            f"method '{self.name}' is data-free and needs a class-conditional teacher or, for a text "
            f"teacher, data.source set to a .txt prompt file (got {self.recipe.data.source!r})",
            "use a class-conditional teacher or give a prompt file",
        )


class TeacherTrajectories:
    """One guided teacher DDIM trajectory per batch slot on ``timesteps`` (descending), ending at ``end``."""

    def __init__(self, method: DiffusionMethod, timesteps: list[int], scale, end: int = -1) -> None:
        self.method, self.scale = method, scale  # scale(b) -> w [b]
        self.grid = torch.tensor([*timesteps, end], device=method.ctx.device)
        self.x: torch.Tensor | None = None

    @property
    def steps(self) -> int:
        return int(self.grid.numel()) - 1

    def current(self, batch: dict[str, Any]):
        """(x_t, t, cond, uncond, w) of every slot, restarting the slots that reached the end."""
        m, b = self.method, self.method.batch_size(batch)
        if self.x is None:
            self.x = torch.randn(m.noise_shape(b), device=m.ctx.device)
            self.k = torch.zeros(b, dtype=torch.long, device=m.ctx.device)
            self.cond, self.uncond, self.w = batch["cond"], batch["uncond"], self.scale(b)
            self._stagger(torch.randint(0, self.steps, (b,), device=m.ctx.device))
        done = self.k >= self.steps
        if done.any():
            self.x = torch.where(_rows(done, self.x), torch.randn_like(self.x), self.x)
            self.k = torch.where(done, torch.zeros_like(self.k), self.k)
            self.cond = _replace(self.cond, batch["cond"], done)
            self.uncond = _replace(self.uncond, batch["uncond"], done)
            self.w = torch.where(done, self.scale(b), self.w)
        return self.x, self.grid[self.k], self.cond, self.uncond, self.w

    @torch.no_grad()
    def advance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Moves every slot one teacher DDIM step (clipped CFG x0, eps at its w); returns (x_next, t_next)."""
        m = self.method
        x0, eps = m.x0_eps(m.teacher.unet, self.x, self.grid[self.k], self.cond, self.uncond, self.w)
        self.k = self.k + 1
        a, s = m.coeffs(self.grid[self.k])
        self.x = gen.ddim_step(x0, eps, a, s)
        return self.x, self.grid[self.k]

    def _stagger(self, k: torch.Tensor) -> None:
        """Advances slot i by k_i steps (one batched teacher call per step, finished slots kept)."""
        for j in range(int(k.max())):
            x, steps = self.x, self.k
            self.advance()
            self.x = torch.where(_rows(j < k, x), self.x, x)
            self.k = torch.where(j < k, self.k, steps)


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *([1] * (like.dim() - 1)))


def _replace(old: dict[str, Any], new: dict[str, Any], mask: torch.Tensor) -> dict[str, Any]:
    return {k: v if v is None else torch.where(_rows(mask, v), new[k], v) for k, v in old.items()}
