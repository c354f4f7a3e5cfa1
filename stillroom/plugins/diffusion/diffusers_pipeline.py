"""A stillroom few-step generator student as a diffusers pipeline (copied as ``pipeline.py``).

``stillroom export RUN --to diffusers`` copies this file's text, unchanged, into the exported folder,
so it imports only torch, numpy and diffusers: the folder must load where stillroom is not installed,

    DiffusionPipeline.from_pretrained(D, custom_pipeline=str(D), trust_remote_code=True)

Everything that differs between students lives in the folder's configs, never in this file (diffusers
caches custom pipeline modules by file name, so one text serves every export):

    unet/        the student's UNet2DModel (a Phased DMD student's expert 0)
    unet_1/ ...  a Phased DMD student's experts 1, 2, 3 (plain UNet2DModels; at most ``EXPERT_SLOTS``)
    guidance_adapter/  an AGD student's adapters (``StillroomGuidanceAdapter``; ``unet/`` is then the
                 frozen teacher), with this file again as ``guidance_adapter/pipeline.py``: diffusers
                 loads a custom component's class from a file in the component's own folder
    scheduler/   a DDIMScheduler config: the noise schedule (abar_t), the student's ``prediction_type``
                 and ``timestep_spacing="trailing"``, whose grid for the distilled step count is exactly
                 the timesteps the student was distilled for (the exporter checks this); or, for a
                 student of a flow-matching teacher, its FlowMatchEulerDiscreteScheduler config (shift 1):
                 a_t = 1 - t / T, s_t = t / T, the grid round(T (1 - k / K)), prediction "flow"
    model_index.json  also this pipeline's own config: ``num_inference_steps`` (the distilled K),
                 ``conditioning`` ("class" or null), ``guidance_scale``, ``null_class``, ``boundary``,
                 ``phase_boundaries`` (Phased DMD: [b_1 > ... > b_{E-1}], the timesteps where experts
                 1..E-1 take over)

The sampler is stillroom's ``FewStepGenerator`` (``stillroom/plugins/diffusion/sampler.py``), step for
step. From x = noise at t_1 > ... > t_K, with a_t = sqrt(abar_t) and s_t = sqrt(1 - abar_t):

    unet  = expert e(t_k) = #{i : t_k <= b_i}       (Phased DMD; otherwise the one UNet)
    out   = unet(x, t_k, y)                        or, with guidance w (classifier-free, two calls),
          = unet(x, t_k, null) + w (unet(x, t_k, y) - unet(x, t_k, null))
          or, for an AGD student (one call approximating the two), the UNet with the guidance
          adapters at scale w (``StillroomGuidanceAdapter``), clipped to x0 when the teacher clips
    x0, eps from out, since x = a x0 + s eps:      epsilon: x0 = (x - s out) / a, eps = out
                                                   sample:  x0 = out, eps = (x - a out) / s
                                                   v_prediction: x0 = a x - s out, eps = s x + a out
                                                   flow (v = eps - x0): x0 = x - s out, eps = x + a out
    consistency students (``boundary``, LCM / Hyper-SD segment end e_k), first:
          f = c_skip x + c_out (a_e x0 + s_e eps)   and (x0, eps) := the DDIM line through (t, x), (e, f)
    x     = a_{t_{k+1}} x0 + s_{t_{k+1}} eps       (deterministic DDIM, eta = 0; a = 1, s = 0 after t_K)

and the image is clamp(x, -1, 1) mapped to [0, 1]. It has no random op after the initial noise, which
is drawn as ``torch.randn((n, C, H, W), generator=generator)``, so a seeded generator reproduces
stillroom's own samples. Another ``num_inference_steps`` uses the trailing grid for that K, as
``stillroom.plugins.diffusion.sampler.retarget`` does (a student is best at its distilled K).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn
from torch.nn import functional as F

# diffusers loads only the components ``__init__`` names, so a Phased DMD student's experts fill named slots
EXPERT_SLOTS = ("unet", "unet_1", "unet_2", "unet_3")


class StillroomGuidanceAdapter(ModelMixin, ConfigMixin):
    """AGD's offset adapters (Jensen & Sadat 2025, "Efficient Distillation of Classifier-Free Guidance using
    Adapters"), applied to the frozen UNet for one call (stillroom's ``guidance_adapter.py``, weights and
    arithmetic alike). With e_w LCM's sinusoidal embedding of w and tau the UNet's time embedding, every
    site in ``sites`` (the mid block and the up blocks: [module name, channels]) with output h becomes

        g = SiLU(A e_w + B tau),   h <- h + (w - 1) U(SiLU(D h + F g))

    so that one forward pass approximates classifier-free guidance at scale w (w = 1: the plain UNet).
    ``clip_sample`` (the teacher's DDIM clip range r, epsilon teachers) is read by the pipeline.
    """

    @register_to_config
    def __init__(
        self,
        sites: list,
        rank: int,
        embed_dim: int,
        hidden: int,
        time_embed_dim: int,
        clip_sample: float | None = None,
    ) -> None:
        super().__init__()
        self.w_proj = nn.Linear(embed_dim, hidden)
        self.t_proj = nn.Linear(time_embed_dim, hidden)
        self.adapters = nn.ModuleList(_OffsetAdapter(int(c), rank, hidden) for _, c in sites)

    def forward(self, unet, sample, timestep, class_labels, guidance_scale: float) -> torch.Tensor:
        """``unet(sample, timestep, class_labels=class_labels).sample`` with the adapters at scale w."""
        w = torch.full((sample.shape[0],), float(guidance_scale), device=sample.device)
        embed = _guidance_embedding(w, self.config.embed_dim).to(sample.dtype)
        # w - 1 read back from e_w's lowest frequency, sin(0.1 (w - 1)), exactly as stillroom's adapters do
        w1 = torch.asin(embed[:, self.config.embed_dim // 2 - 1].float()) / 0.1
        state = {}

        def condition(module, args, tau):
            state["g"] = F.silu(self.w_proj(embed.to(tau.dtype)) + self.t_proj(tau))

        def offset(i, module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            h = h + w1.to(h.dtype).view(-1, 1, 1, 1) * self.adapters[i](h, state["g"])
            return (h, *output[1:]) if isinstance(output, tuple) else h

        hooks = [unet.time_embedding.register_forward_hook(condition)]
        for i, (name, _) in enumerate(self.config.sites):
            hooks.append(unet.get_submodule(name).register_forward_hook(functools.partial(offset, i)))
        try:
            return unet(sample, timestep, class_labels=class_labels).sample
        finally:
            for hook in hooks:
                hook.remove()


class _OffsetAdapter(nn.Module):
    """h -> U(SiLU(D h + F g)): D a 1x1 conv to ``rank`` channels, F linear, U a 3x3 conv back."""

    def __init__(self, channels: int, rank: int, hidden: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(channels, rank, 1)
        self.film = nn.Linear(hidden, rank)
        self.up = nn.Conv2d(rank, channels, 3, padding=1)

    def forward(self, h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return self.up(F.silu(self.down(h) + self.film(g)[:, :, None, None]))


def _guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """LCM's guidance-scale embedding e_w: sin and cos of 1000 (w - 1) at ``dim / 2`` frequencies."""
    w = (w.float() - 1.0) * 1000.0
    half = dim // 2
    freqs = torch.exp(
        torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1))
    )
    emb = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 == 1 else emb


class StillroomFewStepPipeline(DiffusionPipeline):
    """Few-step sampling of a distilled (class-conditional or unconditional) pixel-space UNet."""

    model_cpu_offload_seq = "unet"
    _optional_components = [*EXPERT_SLOTS[1:], "guidance_adapter"]

    def __init__(
        self,
        unet,
        scheduler,
        unet_1=None,
        unet_2=None,
        unet_3=None,
        guidance_adapter=None,
        num_inference_steps: int = 1,
        conditioning: str | None = None,
        guidance_scale: float | None = None,
        null_class: int | None = None,
        boundary: dict | None = None,
        phase_boundaries: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.register_modules(
            unet=unet,
            unet_1=unet_1,
            unet_2=unet_2,
            unet_3=unet_3,
            guidance_adapter=guidance_adapter,
            scheduler=scheduler,
        )
        self.register_to_config(
            num_inference_steps=num_inference_steps,
            conditioning=conditioning,
            guidance_scale=guidance_scale,
            null_class=null_class,
            boundary=boundary,
            phase_boundaries=phase_boundaries,
        )
        if len(self._experts) != len(phase_boundaries or []) + 1:
            raise ValueError(
                f"{len(self._experts)} expert UNets need {len(self._experts) - 1} phase_boundaries, "
                f"model_index.json has {phase_boundaries}"
            )

    @property
    def _experts(self) -> list:
        return [m for m in (getattr(self, slot) for slot in EXPERT_SLOTS) if m is not None]

    def _unet_at(self, t: int):
        """The UNet answering timestep t: Phased DMD's expert e(t) = #{i : t <= b_i} (else the only one)."""
        return self._experts[sum(t <= int(b) for b in self.config.phase_boundaries or [])]

    def _coef(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(abar_t), sqrt(1 - abar_t)) as float32 scalars; t < 0 is the clean end (abar = 1).

        Computed in float64 and rounded once, as stillroom's sampler buffers are.
        """
        if t < 0:
            return torch.tensor(1.0), torch.tensor(0.0)
        if self._flow:
            sigma = t / int(self.scheduler.config.num_train_timesteps)
            return torch.tensor(1.0 - sigma), torch.tensor(sigma)
        abar = float(self.scheduler.alphas_cumprod.double()[t])
        return torch.tensor(math.sqrt(abar)), torch.tensor(math.sqrt(1.0 - abar))

    @property
    def _flow(self) -> bool:
        return type(self.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"

    def _timesteps(self, steps: int) -> list[int]:
        if self._flow:
            n = int(self.scheduler.config.num_train_timesteps)
            return [int(round(n * (1 - k / steps))) for k in range(steps)]
        self.scheduler.set_timesteps(steps)
        return [int(t) for t in self.scheduler.timesteps]

    def _ends(self, timesteps: list[int]) -> list[int]:
        """Segment ends of a consistency student: the next timestep (Hyper-SD) or 0 (plain LCM)."""
        if self.config.boundary.get("segmented"):
            return timesteps[1:] + [0]
        return [0] * len(timesteps)

    def _predict(self, x, t: int, labels, w: float | None) -> torch.Tensor:
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        unet = self._unet_at(t)
        if self.guidance_adapter is not None:
            return self._adapted(unet, x, t, tt, labels, w)
        if w is None:
            return unet(x, tt, class_labels=labels).sample
        if self.config.conditioning != "class" or self.config.null_class is None:
            raise ValueError("guidance_scale needs a class-conditional student with a null class")
        null = torch.full_like(labels, int(self.config.null_class))
        cond = unet(x, tt, class_labels=labels).sample
        uncond = unet(x, tt, class_labels=null).sample
        return uncond + w * (cond - uncond)

    def _adapted(self, unet, x, t: int, tt, labels, w: float) -> torch.Tensor:
        """AGD: one call of the adapted UNet; with the teacher's clip range r, its clipped x0
        clamp((x - sqrt(1 - abar_t) eps_w) / sqrt(abar_t), -r, r) (the scheduler then says "sample")."""
        out = self.guidance_adapter(unet, x, tt, labels, w)
        r = self.guidance_adapter.config.clip_sample
        if r is None:
            return out
        abar = self.scheduler.alphas_cumprod[t].to(x.device)
        return ((x - (1 - abar).sqrt() * out) / abar.sqrt()).clamp(-r, r)

    @staticmethod
    def _x0_eps(out, x, a, s, prediction: str):
        if prediction == "flow":
            return x - s * out, x + a * out
        if prediction == "epsilon":
            return (x - s * out) / a, out
        if prediction == "sample":
            return out, (x - a * out) / s
        if prediction == "v_prediction":
            return a * x - s * out, s * x + a * out
        raise ValueError(f"unknown prediction_type '{prediction}'")

    def _consistency(self, x, x0, eps, t: int, end: int):
        """LCM's f(x, t) = c_skip x + c_out x_e, returned as the (x0, eps) of the line through f."""
        spec = self.config.boundary
        a, s = self._coef(t)
        a_e, s_e = self._coef(end)
        scaled = (t - end) * float(spec["timestep_scaling"])
        sd2 = float(spec["sigma_data"]) ** 2
        c_skip = torch.tensor(sd2 / (scaled**2 + sd2))
        c_out = torch.tensor(scaled / (scaled**2 + sd2) ** 0.5)
        f = c_skip * x + c_out * (a_e * x0 + s_e * eps)
        det = a * s_e - a_e * s
        return (s_e * x - s * f) / det, (a * f - a_e * x) / det

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int] | torch.Tensor | None = None,
        batch_size: int = 1,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Images for ``class_labels`` (class students; one per label) or ``batch_size`` images.

        ``num_inference_steps`` defaults to the distilled K and ``guidance_scale`` to the student's own
        (None: guidance is baked into the weights; an AGD student's adapters take any w, best inside
        the range they were trained on). ``output_type``: "pil", "np" ((n, H, W, C) in
        [0, 1]) or "pt" ((n, C, H, W) in [0, 1]).
        """
        conditional = self.config.conditioning == "class"
        if conditional and class_labels is None:
            raise ValueError("this student is class-conditional: pass class_labels, e.g. [3, 7]")
        if not conditional and class_labels is not None:
            raise ValueError("this student is unconditional: pass batch_size instead of class_labels")
        labels = None
        if conditional:
            labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1).to(self.device)
            batch_size = int(labels.shape[0])
        steps = int(num_inference_steps or self.config.num_inference_steps)
        w = self.config.guidance_scale if guidance_scale is None else float(guidance_scale)
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch_size, self.unet.config.in_channels, height, width)
        rng_device = generator.device if generator is not None else torch.device("cpu")
        x = torch.randn(shape, generator=generator, device=rng_device).to(self.device, self.unet.dtype)

        timesteps = self._timesteps(steps)
        ends = self._ends(timesteps) if self.config.boundary else None
        prediction = "flow" if self._flow else self.scheduler.config.prediction_type
        for k, t in enumerate(self.progress_bar(timesteps)):
            a, s = self._coef(t)
            x0, eps = self._x0_eps(self._predict(x, t, labels, w), x, a, s, prediction)
            if ends is not None:
                x0, eps = self._consistency(x, x0, eps, t, ends[k])
            a_next, s_next = self._coef(timesteps[k + 1] if k + 1 < len(timesteps) else -1)
            x = a_next * x0 + s_next * eps

        image = (x.clamp(-1.0, 1.0).float() + 1.0) / 2.0
        if output_type == "pt":
            result = image.cpu()
        elif output_type in ("np", "pil"):
            result = image.cpu().permute(0, 2, 3, 1).numpy().astype(np.float32)
            if output_type == "pil":
                result = self.numpy_to_pil(result)
        else:
            raise ValueError(f"output_type '{output_type}' is not one of 'pil', 'np', 'pt'")
        self.maybe_free_model_hooks()
        if not return_dict:
            return (result,)
        return ImagePipelineOutput(images=result)
