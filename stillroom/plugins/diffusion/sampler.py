"""Few-step generators: a distilled UNet plus its own sampling schedule, as one tensor program.

A *generator student directory* (what the diffusion methods' ``save_student`` writes) holds

    unet/            diffusers ``save_pretrained`` (safetensors): UNet2DModel or UNet2DConditionModel
    scheduler/       the teacher's scheduler config (only its noise schedule ``alphas_cumprod`` is used)
    text_encoder/    optional (text-conditional students), transformers ``save_pretrained``
    tokenizer/       optional, with ``text_encoder/``
    vae/             optional (latent students): AutoencoderKL; the generator decodes latents to pixels
    stillroom.json   written by the trainer; its ``"sampler"`` field fully determines sampling:

    {"steps": K, "timesteps": [t_1 > ... > t_K],   # the student's network evaluations
     "guidance": w | null,        # CFG scale applied at sampling time (null: guidance is baked in);
                                  # with guidance_embed it is the default w fed to the w-embedding
     "guidance_embed": bool,      # LCM's guidance-scale embedding (UNet2DConditionModel time_cond_proj_dim)
     "prediction": "epsilon" | "sample" | "v_prediction" | "flow",   # what the UNet outputs
     "boundary": null | {"sigma_data": 0.5, "timestep_scaling": 10.0, "ends": [e_1, ..., e_K]},
     "conditioning": "class" | "text" | null, "num_classes": int | null, "null_class": int | null,
     "image_size": int, "channels": int, "latent": bool,
     "hybrid": null | {"teacher": spec, "timesteps": [s_1 > ... > s_J], "handover": t_1, "guidance": w,
                "prediction": teacher's, "clip_sample": r | null}}   # r: teacher x0 clamped, eps re-derived

Both kinds of teacher noise the same way, x_t = a_t x0 + s_t eps, with (a_t, s_t) from the scheduler
(``schedule_coefficients``): a DDPM ("VP") schedule has a_t = sqrt(abar_t), s_t = sqrt(1 - abar_t) for
integer t in [0, T); a flow-matching schedule (diffusers' ``FlowMatchEulerDiscreteScheduler``,
rectified flow) has a_t = 1 - t / T, s_t = t / T for integer t in [0, T], the UNet's timestep input
being t = 1000 sigma, and a flow network predicts the velocity v = eps - x0.

Sampling (``FewStepGenerator.forward``) is deterministic: x_T = noise; for each step k the UNet output
is turned into (x0_hat, eps_hat) and the state moves to the next timestep with the DDIM update
(Song et al. 2021, "Denoising Diffusion Implicit Models", eta = 0)

    x_{t_{k+1}} = a_{t_{k+1}} x0_hat + s_{t_{k+1}} eps_hat       (a = 1, s = 0 after the last step)

which on a flow schedule is exactly the Euler step x_{t_{k+1}} = x_{t_k} + (sigma_{k+1} - sigma_k) v_hat
(``FlowMatchEulerDiscreteScheduler.step``).

so the graph has no random ops (LCM re-noises with fresh noise between steps; we re-use the predicted
noise instead, which keeps the export a pure function of the input noise). Consistency students
(``boundary``) first form the consistency function f(x, t) = c_skip(t - e) x + c_out(t - e) x_e, where
x_e is the DDIM jump of the raw prediction to the segment end e (Luo et al. 2023 "Latent Consistency
Models"; Ren et al. 2024 "Hyper-SD" segments), and (x0_hat, eps_hat) are the unique pair for which
the DDIM line through (t, x) also passes through (e, f). The ``hybrid`` option (Gandikota & Bau 2025,
"Distilling Diversity and Control in Diffusion Models") first runs J teacher DDIM steps from pure noise
down to the handover timestep t_1, then the student. All schedule numbers are buffers computed at
construction, so ``torch.onnx.export(dynamo=True)`` unrolls forward into one graph with dynamic batch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stillroom.core.errors import StillroomError
from stillroom.plugins.diffusion.models import is_flow

PREDICTIONS = ("epsilon", "sample", "v_prediction", "flow")


# -- schedule helpers (shared with the method plugins) -----------------------------------------------
def alphas_cumprod(scheduler_config: dict[str, Any]) -> torch.Tensor:
    """abar_t for t = 0..T-1 in float64, computed by diffusers' DDIMScheduler from the config."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(dict(scheduler_config))
    return sched.alphas_cumprod.double()


def schedule_coefficients(scheduler_config: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(a_t, s_t) in float64 for every integer timestep t, where x_t = a_t x0 + s_t eps.

    VP (DDPM) schedules: t = 0..T-1, a = sqrt(abar_t), s = sqrt(1 - abar_t). Flow matching: t = 0..T,
    sigma_t = t / T, a = 1 - sigma_t, s = sigma_t (t = T is pure noise; only ``shift = 1`` is a fixed
    grid, so a shifted flow schedule is refused).
    """
    if is_flow(scheduler_config):
        if float(scheduler_config.get("shift", 1.0)) != 1.0 or scheduler_config.get("use_dynamic_shifting"):
            raise StillroomError(
                "flow-matching schedulers with a timestep shift are not supported",
                "use a FlowMatchEulerDiscreteScheduler with shift=1 and no dynamic shifting",
            )
        n = int(scheduler_config.get("num_train_timesteps", 1000))
        sigma = torch.arange(n + 1, dtype=torch.float64) / n
        return 1.0 - sigma, sigma
    ab = alphas_cumprod(scheduler_config)
    return ab.sqrt(), (1.0 - ab).sqrt()


def schedule_length(scheduler_config: dict[str, Any]) -> int:
    """How many integer timesteps ``schedule_coefficients`` has: T (VP, 0..T-1) or T + 1 (flow, 0..T)."""
    n = int(scheduler_config.get("num_train_timesteps", 1000))
    return n + 1 if is_flow(scheduler_config) else n


def ddim_timesteps(scheduler_config: dict[str, Any], steps: int) -> list[int]:
    """The DDIM timesteps for ``steps`` steps with *trailing* spacing (diffusers' DDIMScheduler).

    Trailing spacing ("Common Diffusion Noise Schedules and Sample Steps are Flawed", Lin et al. 2024)
    starts at t = T - 1, so a one-step sampler starts from pure noise. On a flow schedule the grid is
    round(T (1 - k / K)) for k < K: it starts at t = T (sigma = 1, pure noise).
    """
    from diffusers import DDIMScheduler

    if steps < 1:
        raise StillroomError(f"sampler steps must be >= 1, got {steps}", "use 1 to 4 for a student")
    if is_flow(scheduler_config):
        n = int(scheduler_config.get("num_train_timesteps", 1000))
        return [int(round(n * (1 - k / steps))) for k in range(steps)]
    sched = DDIMScheduler.from_config(dict(scheduler_config), timestep_spacing="trailing")
    sched.set_timesteps(steps)
    return [int(t) for t in sched.timesteps]


def to_x0_eps(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, s: torch.Tensor, prediction: str):
    """(x0, eps) from a UNet output, where x = a x0 + s eps (VP: a = sqrt(abar_t), s = sqrt(1 - abar_t);
    flow: a = 1 - sigma, s = sigma)."""
    if prediction == "flow":  # v = eps - x0 on a flow schedule (a + s = 1): x0 = x - s v, eps = x + a v
        return x - s * out, x + a * out
    if prediction == "epsilon":
        return (x - s * out) / a, out
    if prediction == "sample":
        return out, (x - a * out) / s
    if prediction == "v_prediction":  # v = a eps - s x0 (Salimans & Ho 2022)
        return a * x - s * out, s * x + a * out
    raise StillroomError(f"unknown prediction type '{prediction}'", f"use one of {', '.join(PREDICTIONS)}")


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, a_next, s_next) -> torch.Tensor:
    """Deterministic DDIM update: x_next = sqrt(abar_next) x0 + sqrt(1 - abar_next) eps."""
    return a_next * x0 + s_next * eps


def consistency_scalings(delta_t, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """LCM's boundary-condition scalings at time distance delta_t = t - e from the boundary e:

        c_skip = sigma_data^2 / ((s dt)^2 + sigma_data^2),   c_out = s dt / sqrt((s dt)^2 + sigma_data^2)

    so that c_skip = 1 and c_out = 0 at dt = 0: f(x, e) = x exactly.
    """
    scaled = torch.as_tensor(delta_t, dtype=torch.float64) * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """LCM's guidance-scale embedding (sinusoidal of 1000 (w - 1)), as in diffusers' LCM pipeline."""
    w = (w.float() - 1.0) * 1000.0
    half = dim // 2
    freqs = torch.exp(
        torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1))
    )
    emb = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def solve_pair(x, f, a_t, s_t, a_e, s_e):
    """The (x0, eps) with x = a_t x0 + s_t eps and f = a_e x0 + s_e eps (two points of one DDIM line)."""
    det = a_t * s_e - a_e * s_t
    return (s_e * x - s_t * f) / det, (a_t * f - a_e * x) / det


# -- the generator ------------------------------------------------------------------------------
class FewStepGenerator(nn.Module):
    """The student UNet and its K-step deterministic sampler (see the module docstring)."""

    def __init__(
        self,
        unet: nn.Module,
        sampler: dict[str, Any],
        abar: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        uncond_embedding: torch.Tensor | None = None,
        vae: nn.Module | None = None,
        teacher_unet: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.unet, self.vae, self.teacher_unet = unet, vae, teacher_unet
        self.sampler = dict(sampler)
        self.prediction = sampler["prediction"]
        self.conditioning = sampler.get("conditioning")
        self.null_class = sampler.get("null_class")
        self.guidance = sampler.get("guidance")
        self.guidance_embed = bool(sampler.get("guidance_embed"))
        ts = [int(t) for t in sampler["timesteps"]]
        if len(ts) != int(sampler["steps"]) or any(b >= a for a, b in zip(ts, ts[1:], strict=False)):
            raise StillroomError(
                f"sampler timesteps {ts} do not match steps={sampler['steps']} or do not decrease",
                "fix stillroom.json or retrain the student",
            )
        # abar_t of a VP schedule, or the (a_t, s_t) tables of ``schedule_coefficients`` (any schedule)
        a_of, s_of = abar if isinstance(abar, tuple) else (abar.double().sqrt(), (1.0 - abar.double()).sqrt())

        def coef(t: int) -> tuple[float, float]:  # t = -1 means the clean end (a = 1, s = 0)
            return (1.0, 0.0) if t < 0 else (float(a_of[t]), float(s_of[t]))

        nxt = ts[1:] + [-1]
        self.register_buffer("timesteps", torch.tensor(ts, dtype=torch.long), persistent=False)
        self._buffers_for("s", [coef(t) for t in ts], [coef(t) for t in nxt])
        boundary = sampler.get("boundary")
        if boundary:
            ends = [int(e) for e in boundary["ends"]]
            if len(ends) != len(ts) or any(e >= t for e, t in zip(ends, ts, strict=True)):
                raise StillroomError(
                    f"boundary ends {ends} must be one per step and below its timestep", "fix stillroom.json"
                )
            c_skip, c_out = consistency_scalings(
                torch.tensor(ts) - torch.tensor(ends), boundary["sigma_data"], boundary["timestep_scaling"]
            )
            self.register_buffer("c_skip", c_skip.float(), persistent=False)
            self.register_buffer("c_out", c_out.float(), persistent=False)
            e = torch.tensor([coef(t) for t in ends], dtype=torch.float64)
            self.register_buffer("a_end", e[:, 0].float(), persistent=False)
            self.register_buffer("s_end", e[:, 1].float(), persistent=False)
        self.boundary = bool(boundary)
        hybrid = sampler.get("hybrid")
        self.hybrid = hybrid if hybrid and teacher_unet is not None else None
        if hybrid and teacher_unet is None:
            raise StillroomError(
                "the sampler asks for the hybrid teacher but none was given", "pass teacher_unet"
            )
        if self.hybrid:
            hts = [int(t) for t in hybrid["timesteps"]]
            self.register_buffer("teacher_timesteps", torch.tensor(hts, dtype=torch.long), persistent=False)
            self._buffers_for("h", [coef(t) for t in hts], [coef(t) for t in hts[1:] + [ts[0]]])
        if uncond_embedding is not None:
            self.register_buffer("uncond_embedding", uncond_embedding.detach().float(), persistent=False)
        else:
            self.uncond_embedding = None
        self.scaling_factor = float(getattr(getattr(vae, "config", None), "scaling_factor", 1.0) or 1.0)

    def _buffers_for(
        self, prefix: str, now: list[tuple[float, float]], nxt: list[tuple[float, float]]
    ) -> None:
        now_t, nxt_t = torch.tensor(now, dtype=torch.float64), torch.tensor(nxt, dtype=torch.float64)
        self.register_buffer(f"{prefix}_a", now_t[:, 0].float(), persistent=False)
        self.register_buffer(f"{prefix}_s", now_t[:, 1].float(), persistent=False)
        self.register_buffer(f"{prefix}_a_next", nxt_t[:, 0].float(), persistent=False)
        self.register_buffer(f"{prefix}_s_next", nxt_t[:, 1].float(), persistent=False)

    @property
    def steps(self) -> int:
        return int(self.timesteps.numel())

    # -- one network evaluation with optional classifier-free guidance ------------------------------
    def _eval(
        self, unet, x, t, class_labels, encoder_hidden_states, w, cfg: bool, embed: torch.Tensor | None
    ):
        b = x.shape[0]
        tt = t.expand(b)
        if not cfg:
            return _call_unet(unet, x, tt, class_labels, encoder_hidden_states, embed)
        # Two evaluations rather than one on a doubled batch: the same arithmetic, but the exported
        # graph keeps a symbolic batch dimension (a concatenated batch pins it to 2 under dynamo).
        if self.conditioning == "class":
            null = torch.full_like(class_labels, int(self.null_class))
            cond = _call_unet(unet, x, tt, class_labels, None, None)
            uncond = _call_unet(unet, x, tt, null, None, None)
        else:
            unc = self.uncond_embedding.to(encoder_hidden_states.dtype).expand(b, -1, -1)
            cond = _call_unet(unet, x, tt, None, encoder_hidden_states, None)
            uncond = _call_unet(unet, x, tt, None, unc, None)
        return uncond + w * (cond - uncond)

    def denoise(
        self, k: int, x: torch.Tensor, class_labels=None, encoder_hidden_states=None, w=None, embed=None
    ):
        """(x0_hat, eps_hat) of student step ``k`` at state ``x`` (consistency boundary applied)."""
        cfg = w is not None and not self.guidance_embed
        out = self._eval(self.unet, x, self.timesteps[k], class_labels, encoder_hidden_states, w, cfg, embed)
        x0, eps = to_x0_eps(out, x, self.s_a[k], self.s_s[k], self.prediction)
        if self.boundary:
            x_end = ddim_step(x0, eps, self.a_end[k], self.s_end[k])
            f = self.c_skip[k] * x + self.c_out[k] * x_end
            x0, eps = solve_pair(x, f, self.s_a[k], self.s_s[k], self.a_end[k], self.s_end[k])
        return x0, eps

    def forward(
        self,
        noise: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        guidance_scale: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        x = noise
        b = x.shape[0]
        if guidance_scale is None:
            guidance_scale = self.guidance
        w = None
        if guidance_scale is not None:
            w = torch.as_tensor(guidance_scale, dtype=x.dtype, device=x.device).reshape(-1)
            w = w.expand(b).reshape(b, *([1] * (x.dim() - 1)))
        if self.hybrid is not None:
            hw = self.hybrid.get("guidance")
            for j in range(int(self.teacher_timesteps.numel())):
                out = self._eval(
                    self.teacher_unet,
                    x,
                    self.teacher_timesteps[j],
                    class_labels,
                    encoder_hidden_states,
                    hw,
                    hw is not None,
                    None,
                )
                x0, eps = to_x0_eps(
                    out, x, self.h_a[j], self.h_s[j], self.hybrid.get("prediction", "epsilon")
                )
                if self.hybrid.get("clip_sample") is not None:  # clamp x0, re-derive eps (GLIDE, diffusers)
                    r = float(self.hybrid["clip_sample"])
                    x0 = x0.clamp(-r, r)
                    eps = (x - self.h_a[j] * x0) / self.h_s[j]
                x = ddim_step(x0, eps, self.h_a_next[j], self.h_s_next[j])
        embed = None
        if self.guidance_embed:
            dim = self.unet.config.time_cond_proj_dim
            embed = guidance_embedding(w.reshape(b) if w is not None else torch.ones(b, device=x.device), dim)
            embed = embed.to(x.dtype)
        for k in range(self.steps):
            x0, eps = self.denoise(k, x, class_labels, encoder_hidden_states, w, embed)
            # the last step lands on the clean end (a = 1, s = 0): x0 itself, also where eps is not finite
            # (an x0 student at t = 0 of a flow schedule, s = 0, as BOOT's samples)
            x = ddim_step(x0, eps, self.s_a_next[k], self.s_s_next[k]) if k + 1 < self.steps else x0
        if self.vae is not None:
            x = self.vae.decode(x / self.scaling_factor).sample
        return x.clamp(-1.0, 1.0)


def _call_unet(unet, x, t, class_labels, encoder_hidden_states, embed):
    kwargs = {"timestep_cond": embed} if embed is not None else {}  # guidance-adapted class UNets take it too
    if encoder_hidden_states is not None:
        return unet(x, t, encoder_hidden_states=encoder_hidden_states, **kwargs).sample
    return unet(x, t, class_labels=class_labels, **kwargs).sample


# -- loading ------------------------------------------------------------------------------------
def with_hybrid(
    sampler: dict[str, Any],
    teacher: str,
    timesteps: int,
    teacher_steps: int,
    handover: int,
    guidance: float | None,
    prediction: str,
    clip_sample: float | None = None,
) -> dict[str, Any]:
    """``sampler`` with the hybrid option: ``teacher_steps`` teacher DDIM steps from the noisiest of the
    schedule's ``timesteps`` integer timesteps (``schedule_length``: T - 1 on VP, T on flow) down to
    ``handover``, then the student from ``handover`` on (its steps above the handover are dropped).

    Gandikota & Bau 2025: the first, structure-setting step(s) of the base model restore diversity; the
    distilled model finishes. The student step that covered ``handover`` keeps its segment end.
    ``clip_sample`` (the teacher scheduler's clip range, pixel teachers) clamps the teacher's x0 and
    re-derives its eps from it, as diffusers' DDIM step does with ``use_clipped_model_output=True``.
    """
    ts = [int(t) for t in sampler["timesteps"]]
    top = timesteps - 1
    if not 0 < handover < top or teacher_steps < 1:
        raise StillroomError(
            f"hybrid handover {handover} must lie in (0, {top}) with >= 1 teacher step",
            "set student.hybrid_handover / student.hybrid_teacher_steps",
        )
    kept = [t for t in ts if t < handover]
    out = {**sampler, "timesteps": [handover, *kept], "steps": 1 + len(kept)}
    if sampler.get("boundary"):
        ends = [int(e) for e in sampler["boundary"]["ends"]]
        covering = [e for t, e in zip(ts, ends, strict=True) if t >= handover and e < handover]
        out["boundary"] = {
            **sampler["boundary"],
            "ends": [min(covering) if covering else 0]
            + [e for t, e in zip(ts, ends, strict=True) if t < handover],
        }
    span = (top - handover) / teacher_steps
    teacher_ts = [int(round(top - j * span)) for j in range(teacher_steps)]
    out["hybrid"] = {
        "teacher": teacher,
        "timesteps": teacher_ts,
        "handover": handover,
        "guidance": guidance,
        "prediction": prediction,
        "clip_sample": clip_sample,
    }
    return out


def retarget(sampler: dict[str, Any], scheduler_config: dict[str, Any], steps: int) -> dict[str, Any]:
    """The same sampler with ``steps`` trailing-DDIM timesteps (segment ends follow the new grid)."""
    out = {**sampler, "hybrid": None}
    ts = ddim_timesteps(scheduler_config, steps)
    out["steps"], out["timesteps"] = len(ts), ts
    if sampler.get("boundary"):
        segmented = set(int(e) for e in sampler["boundary"]["ends"]) != {0}
        out["boundary"] = {**sampler["boundary"], "ends": ts[1:] + [0] if segmented else [0] * len(ts)}
    hybrid = sampler.get("hybrid")
    if hybrid:
        out = with_hybrid(
            out,
            hybrid["teacher"],
            schedule_length(scheduler_config),
            len(hybrid["timesteps"]),
            int(hybrid["handover"]),
            hybrid.get("guidance"),
            hybrid.get("prediction", "epsilon"),
            hybrid.get("clip_sample"),
        )
    return out


def load_generator(student_dir: str | Path, steps: int | None = None) -> FewStepGenerator:
    """A ``FewStepGenerator`` (eval mode, CPU, float32) from a generator student directory.

    ``steps`` re-targets the student to another number of steps on the trailing DDIM grid (a
    student is best at the steps it was trained for).
    """
    import diffusers

    from stillroom.plugins.diffusion import models as diffusion_models

    root = Path(student_dir)
    card_path = root / "stillroom.json"
    if not card_path.is_file() or not (root / "unet").is_dir():
        raise StillroomError(
            f"'{root}' is not a generator student directory (no stillroom.json or unet/)",
            "point at the 'student' directory of a diffusion run",
        )
    sampler = json.loads(card_path.read_text()).get("sampler")
    if not sampler:
        raise StillroomError(f"'{card_path}' has no sampler", "it is not a generator student")
    sched_cfg = dict(diffusers.DDIMScheduler.load_config(root / "scheduler"))
    if steps is not None and steps != sampler["steps"]:
        sampler = retarget(sampler, sched_cfg, steps)
    unet = diffusion_models.load_unet(root / "unet")
    coefficients = schedule_coefficients(sched_cfg)
    if (root / "guidance_adapter").is_dir():  # AGD: the frozen teacher UNet + guidance adapters
        from stillroom.plugins.diffusion.guidance_adapter import load_adapted

        # alpha-bar = a^2, read only by a VP epsilon teacher's x0 clamp
        unet = load_adapted(unet, root / "guidance_adapter", coefficients[0] ** 2)
    uncond, vae = None, None
    if (root / "text_encoder").is_dir():
        encoder, tokenizer = diffusion_models.load_text_encoder(root)
        uncond = diffusion_models.encode_prompts(encoder, tokenizer, [""])
    if (root / "vae").is_dir() and sampler.get("latent"):
        vae = diffusers.AutoencoderKL.from_pretrained(root / "vae")
    teacher_unet = None
    if sampler.get("hybrid"):
        teacher_unet = diffusion_models.load_teacher(sampler["hybrid"]["teacher"]).unet
    gen = FewStepGenerator(unet, sampler, coefficients, uncond, vae, teacher_unet)
    return gen.eval().requires_grad_(False)
