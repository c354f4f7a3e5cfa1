"""Consistency distillation as in LCM (Luo et al. 2023, "Latent Consistency Models: Synthesizing
High-Resolution Images with Few-Step Inference") with Hyper-SD's trajectory segments (Ren et al.
2024, "Hyper-SD: Trajectory Segmented Consistency Model for Efficient Image Synthesis").

Skipping-step solver: on the N-point DDIM grid (t_n = (n + 1) T/N - 1) a teacher DDIM step with CFG
scale w goes from x_{t_{n+1}} to x_hat_{t_n} (eq. 8 of LCM, with the augmented PF-ODE of eq. 9).
Boundary-condition parametrisation (LCM eq. 5, here relative to the segment end e of t):

    f_theta(x, t) = c_skip(t - e) x + c_out(t - e) x_e(x, t),
    c_skip(d) = sigma_data^2 / ((s d)^2 + sigma_data^2),  c_out(d) = s d / sqrt((s d)^2 + sigma_data^2)

where x_e is the DDIM jump of the UNet's prediction from t to e, so f(x, e) = x exactly (with one
segment, e = 0 and f is LCM's consistency function, f(x, 0) = x). Loss (LCM eq. 10):

    L = d(f_theta(x_{t_{n+1}}, t_{n+1}, w), f_theta-(x_hat_{t_n}, t_n, w)),
    d = ||.||^2 / dim ("l2") or pseudo-Huber d(a, b) = sqrt(||a - b||_2^2 + c^2) - c ("huber"),

the pseudo-Huber metric of improved consistency training (Song & Dhariwal 2023, "Improved Techniques
for Training Consistency Models", sec. 3.3): ||.||_2 is each sample's vector norm over all its
C x H x W values and c = 0.00054 sqrt(dim) by default (their choice; ``huber_c`` overrides it).
LCM's training script applies the same formula element-wise with c = 0.001, which is a different
metric: per element it is L1-like almost everywhere, where the per-sample form is L2 for small
errors and L1 only for outliers, which is the point of it.

with theta- an EMA of theta (the target network). Hyper-SD divides [0, T) into K segments and learns
consistency within each (the target maps to the segment's lower end); ``segments: [8, 4, 2, 1]`` runs
stages of ``steps_per_stage`` steps with 8, 4, 2 and finally 1 segment. With ``guidance_embed`` the
student receives LCM's w-embedding (UNet2DConditionModel ``time_cond_proj_dim``, zero-initialised)
and w is drawn from [guidance_min, guidance_max] each step.
"""

from __future__ import annotations

import copy
import math
from typing import Literal

import torch
from pydantic import Field

from stillroom.core.errors import StillroomError
from stillroom.core.method import Role, StepOutput
from stillroom.plugins.diffusion import sampler as gen
from stillroom.plugins.diffusion.base import DiffusionMethod, DiffusionParams


class ConsistencyParams(DiffusionParams):
    ddim_steps: int = Field(50, ge=2, description="N: points of the skipping-step DDIM grid")
    loss_type: Literal["l2", "huber"] = "huber"
    huber_c: float | None = Field(None, gt=0, description="pseudo-Huber c (default 0.00054 sqrt(dim), iCT)")
    target_ema: float = Field(0.95, ge=0, lt=1, description="EMA decay of the target network theta-")
    sigma_data: float = Field(0.5, gt=0)
    timestep_scaling: float = Field(10.0, gt=0)
    guidance_embed: bool = Field(False, description="LCM w-embedding (text UNets with time_cond_proj_dim)")
    guidance_min: float = Field(2.0, ge=1)
    guidance_max: float = Field(8.0, ge=1)
    embed_dim: int = Field(256, gt=0)
    segments: list[int] = Field([1], description="Hyper-SD stages, e.g. [8, 4, 2, 1]; [1] is plain LCM")
    steps_per_stage: int = Field(100, gt=0)


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """Mean over samples of sqrt(||a_i - b_i||_2^2 + c^2) - c, the norm over each sample's values
    (iCT sec. 3.3); c defaults to 0.00054 sqrt(dim)."""
    d2 = ((a.float() - b.float()) ** 2).flatten(1).sum(1)
    if c is None:
        c = 0.00054 * a[0].numel() ** 0.5
    return (torch.sqrt(d2 + c**2) - c).mean()


def segment_boundaries(grid: list[int], k: int) -> list[int]:
    """Lower ends of the K segments over the ascending grid: [0, grid[ceil(N/K) - 1], ...]."""
    n = len(grid)
    return [0] + [grid[math.ceil(s * n / k) - 1] for s in range(1, k)]


def segment_end(t: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    """The largest boundary strictly below t (0 for the first segment)."""
    b = torch.tensor(bounds, device=t.device)
    below = torch.where(b[None, :] < t[:, None], b[None, :], torch.zeros_like(b)[None, :])
    return below.max(dim=1).values


class Consistency(DiffusionMethod):
    name = "consistency"
    description = "latent consistency distillation (LCM) with optional Hyper-SD trajectory segments"
    paper = "Luo et al. 2023, Latent Consistency Models; Ren et al. 2024, Hyper-SD"
    Params = ConsistencyParams

    def make_student(self):
        p = self.params
        if not p.guidance_embed:
            return super().make_student()
        if self.recipe.student.init:
            raise StillroomError(
                "student.init cannot be combined with method.guidance_embed (the student grows an input)",
                "drop one of them",
            )
        if type(self.teacher.unet).__name__ != "UNet2DConditionModel":
            raise StillroomError(
                "method.guidance_embed needs a UNet2DConditionModel teacher",
                "set method.guidance_embed=false (the teacher's CFG is then baked in)",
            )
        from diffusers import UNet2DConditionModel

        config = dict(self.teacher.unet.config)
        config["time_cond_proj_dim"] = p.embed_dim
        student = UNet2DConditionModel.from_config(config)
        missing, _ = student.load_state_dict(self.teacher.unet.state_dict(), strict=False)
        if any(not m.startswith("time_embedding.cond_proj") for m in missing):
            raise StillroomError(
                "teacher weights do not fit the guidance-embedding student", "report this bug"
            )
        torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
        return student.to(self.ctx.device).train()

    def extra_roles(self):
        p = self.params
        if p.guidance_max < p.guidance_min:
            raise StillroomError("method.guidance_max is below method.guidance_min", "swap them")
        if any(k < 1 or k > p.ddim_steps for k in p.segments):
            raise StillroomError(
                f"method.segments {p.segments} must lie in 1..ddim_steps", "e.g. [8, 4, 2, 1]"
            )
        self.grid = self.lcm_grid(p.ddim_steps)
        self.stage = 0
        self.target = copy.deepcopy(self.student).eval().requires_grad_(False)
        return {"target": Role(self.target, trainable=False, checkpoint=True)}

    def bounds(self) -> list[int]:
        return segment_boundaries(self.grid, self.params.segments[self.stage])

    def after_step(self, step, metrics):
        with torch.no_grad():
            for tp, sp in zip(self.target.parameters(), self.student.parameters(), strict=True):
                tp.lerp_(sp.detach(), 1.0 - self.params.target_ema)
        self.stage = min((step + 1) // self.params.steps_per_stage, len(self.params.segments) - 1)

    def state_dict(self):
        return {"stage": self.stage}

    def load_state_dict(self, state):
        self.stage = int(state.get("stage", 0))

    def consistency_fn(self, unet, x, t, e, cond, embed):
        """f(x, t) = c_skip(t - e) x + c_out(t - e) x_e (see the module docstring)."""
        kwargs = dict(cond)
        if embed is not None:
            kwargs["timestep_cond"] = embed
        out = unet(x, t, **{k: v for k, v in kwargs.items() if v is not None}).sample
        a, s = self.coeffs(t)
        x0, eps = gen.to_x0_eps(out, x, a, s, self.student_prediction)
        a_e, s_e = self.coeffs(e)
        c_skip, c_out = gen.consistency_scalings(t - e, self.params.sigma_data, self.params.timestep_scaling)
        c_skip, c_out = (c.to(x.dtype).view(-1, 1, 1, 1) for c in (c_skip, c_out))
        return c_skip * x + c_out * gen.ddim_step(x0, eps, a_e, s_e)

    def loss(self, role, batch, step) -> StepOutput:
        p = self.params
        x0 = batch["x0"]
        b, dev = x0.shape[0], x0.device
        grid = torch.tensor(self.grid, device=dev)
        n = torch.randint(0, len(self.grid), (b,), device=dev)
        t = grid[n]
        t_prev = torch.where(n > 0, grid[(n - 1).clamp(min=0)], torch.zeros_like(t))
        e = segment_end(t, self.bounds())
        t_prev = torch.maximum(t_prev, e)
        x_t = self.add_noise(x0, t, torch.randn_like(x0))
        if p.guidance_embed:
            w = p.guidance_min + (p.guidance_max - p.guidance_min) * torch.rand(b, device=dev)
            embed = gen.guidance_embedding(w, p.embed_dim).to(x0.dtype)
        else:
            w, embed = self.recipe.teacher.guidance, None
        with torch.no_grad():
            x0_t, eps_t = self.x0_eps(self.teacher.unet, x_t, t, batch["cond"], batch["uncond"], w)
            a_p, s_p = self.coeffs(t_prev)
            x_prev = gen.ddim_step(x0_t, eps_t, a_p, s_p)
            target = self.consistency_fn(self.target, x_prev, t_prev, e, batch["cond"], embed)
        online = self.consistency_fn(self.student, x_t, t, e, batch["cond"], embed)
        if p.loss_type == "huber":
            loss = pseudo_huber(online, target, p.huber_c)
        else:
            loss = ((online.float() - target.float()) ** 2).mean()
        return StepOutput(loss, {"segments": float(p.segments[self.stage])})

    def schedule(self):
        k = self.recipe.student.steps
        segs = self.params.segments[self.stage]
        if segs == 1:
            ts = gen.ddim_timesteps(self.teacher.scheduler.config, k)
            return ts, self._boundary([0] * len(ts))
        bounds = self.bounds()
        if k == segs:  # one step per segment, each landing exactly on the next segment's top
            ts = [self.grid[-1]] + sorted(bounds[1:], reverse=True)
            return ts, self._boundary(sorted(bounds, reverse=True))
        ts = gen.ddim_timesteps(self.teacher.scheduler.config, k)
        ends = segment_end(torch.tensor(ts), bounds).tolist()
        return ts, self._boundary([int(x) for x in ends])

    def _boundary(self, ends: list[int]) -> dict:
        return {
            "sigma_data": self.params.sigma_data,
            "timestep_scaling": self.params.timestep_scaling,
            "ends": ends,
        }

    def sampler(self):
        out = super().sampler()
        if self.params.guidance_embed:
            out["guidance_embed"] = True
            out["guidance"] = self.recipe.teacher.guidance
        return out
