"""What every step-distillation method shares: teacher/student/data sections, roles, data, the
student's sampler, evaluation and saving. A concrete method writes its ``loss`` and its schedule.

The student starts as a copy of the teacher's UNet. Batches are dicts

    {"x0": clean images or VAE latents [B, C, H, W] (None for prompt-only data),
     "cond": UNet kwargs of the condition, "uncond": UNet kwargs of the unconditional input}

and every method samples with the same ``FewStepGenerator`` the export unrolls, so training and
deployment use one set of equations.

Both kinds of teacher noise as x_t = a_t x0 + s_t eps, with (a_t, s_t) from ``sampler.schedule_coefficients``:
a DDPM (VP) teacher has a_t = sqrt(abar_t), s_t = sqrt(1 - abar_t) on t = 0..T-1 and predicts epsilon,
v = a eps - s x0 or x0; a flow-matching teacher (rectified flow) has a_t = 1 - t / T, s_t = t / T on
t = 0..T (t = T is pure noise) and predicts the velocity v = eps - x0. Every coefficient, conversion and
sampler here reads those tables, so a method written with (a_t, s_t) runs on either; a method whose loss
holds only for one kind says so in ``teachers`` and is refused the other in one line.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from stillroom.core.errors import StillroomError
from stillroom.core.method import Method, Params, Role
from stillroom.plugins.diffusion import models as dm
from stillroom.plugins.diffusion import sampler as gen

log = logging.getLogger(__name__)


class DiffusionTeacher(Params):
    path: str = Field("embedded:mnist_teacher", description="diffusers directory, embedded:NAME or hub id")
    guidance: float | None = Field(2.0, ge=1, description="teacher CFG scale baked into the student")


class DiffusionStudent(Params):
    steps: int = Field(1, ge=1, le=64, description="network evaluations of the student's sampler")
    prediction: Literal["auto", "epsilon", "sample", "v_prediction"] = Field(
        "auto",
        description="what the student UNet outputs; auto: v_prediction when the teacher predicts epsilon "
        "and its schedule ends near zero SNR (x0 from epsilon is then ill-conditioned), else the teacher's",
    )
    hybrid_teacher_steps: int = Field(0, ge=0, description="hybrid sampler: teacher steps before the student")
    hybrid_handover: int | None = Field(
        None, gt=0, description="hybrid: timestep where the student takes over"
    )
    init: str | None = Field(
        None,
        description="start from a distilled student directory (a run's student/) instead of the teacher's "
        "weights, e.g. DMD2 fine-tuning of a progressive student",
    )


class DiffusionData(Params):
    source: str = Field(
        "embedded:mnist", description="embedded:mnist, image folder with captions.jsonl, .txt"
    )
    image_size: int | None = Field(None, gt=0, description="pixels; default: the teacher's (x VAE factor)")
    eval_per_class: int = Field(10, ge=2, description="class-conditional evaluation: samples per class")
    eval_seed: int = 1234


class DiffusionParams(Params):
    pass


TEACHER_KINDS = {"ddpm": "DDPM (VP noise schedule)", "flow": "flow-matching (velocity)"}
EXAMPLE_TEACHERS = {"ddpm": "embedded:mnist_teacher", "flow": "embedded:mnist_flow_teacher"}


class DiffusionMethod(Method):
    """Base of the diffusion step-distillation methods (roles: student, frozen teacher [, critic])."""

    family = "generator"
    teachers: tuple[str, ...] = ("ddpm", "flow")  # the teacher kinds the method's equations hold for
    student_predictions: tuple[str, ...] | None = None  # the student outputs its loss is written for
    Teacher = DiffusionTeacher
    Student = DiffusionStudent
    Data = DiffusionData
    Params = DiffusionParams
    needs_images = True

    # -- set-up ---------------------------------------------------------------------------------
    def build(self) -> dict[str, Role]:
        self.teacher = dm.load_teacher(self.recipe.teacher.path)
        dev = self.ctx.device
        for module in (self.teacher.unet, self.teacher.text_encoder, self.teacher.vae):
            if module is not None:
                module.to(dev)
        config = self.teacher.scheduler.config
        self.check_teacher()
        a, s = gen.schedule_coefficients(config)
        self.a_t, self.s_t = a.float().to(dev), s.float().to(dev)
        self.top = int(a.numel()) - 1  # the noisiest timestep: T - 1 (VP) or T (flow, pure noise)
        self.T = int(config["num_train_timesteps"])  # a flow UNet's timestep input is T sigma
        self.student_prediction = student_prediction(
            self.recipe.student.prediction, self.teacher.prediction, float(a[-1]) ** 2
        )
        if self.student_predictions and self.student_prediction not in self.student_predictions:
            raise StillroomError(
                f"{self.name}'s loss is written for a {' or '.join(self.student_predictions)} student; this "
                f"run's student predicts {self.student_prediction}",
                "leave student.prediction on auto",
            )
        self.clip_x0 = (
            float(config.get("clip_sample_range", 1.0))
            if config.get("clip_sample") and self.teacher.vae is None
            else None
        )
        self.uncond_embedding = None
        if self.teacher.conditioning == "text":
            self.uncond_embedding = dm.encode_prompts(self.teacher.text_encoder, self.teacher.tokenizer, [""])
        self.student = self.make_student()
        roles = {"student": Role(self.student), "teacher": Role(self.teacher.unet, trainable=False)}
        roles.update(self.extra_roles())
        if self.recipe.student.hybrid_teacher_steps:
            self.hybrid_handover(self.schedule()[0])  # an untrained handover fails now, not after training
        return roles

    def check_teacher(self) -> None:
        """Refuses, in one line, a teacher whose kind (DDPM or flow) the method's equations do not cover."""
        kind = "flow" if self.teacher.prediction == "flow" else "ddpm"
        if kind not in self.teachers:
            wanted = " or ".join(TEACHER_KINDS[k] for k in self.teachers)
            raise StillroomError(
                f"{self.name} distils {wanted} teachers; teacher '{self.recipe.teacher.path}' is a "
                f"{TEACHER_KINDS[kind]} one",
                f"use a {wanted} teacher such as {EXAMPLE_TEACHERS[self.teachers[0]]}",
            )

    def make_student(self) -> torch.nn.Module:
        init = self.recipe.student.init
        student = copy.deepcopy(self.teacher.unet) if init is None else self.load_init(Path(init))
        student.requires_grad_(True).train()
        return student.to(self.ctx.device)

    def load_init(self, root: Path) -> torch.nn.Module:
        """The UNet of a saved generator student whose parametrisation matches this run's student."""
        card = root / "stillroom.json"
        if not card.is_file() or not (root / "unet").is_dir():
            raise StillroomError(
                f"student.init '{root}' is not a generator student directory (no stillroom.json or unet/)",
                "point at the 'student' directory of a finished diffusion run",
            )
        sampler = json.loads(card.read_text()).get("sampler") or {}
        if sampler.get("prediction") != self.student_prediction:
            raise StillroomError(
                f"student.init '{root}' predicts {sampler.get('prediction')}, this run's student "
                f"{self.student_prediction}",
                f"set student.prediction={sampler.get('prediction')}",
            )
        unet = dm.load_unet(root / "unet")
        if type(unet) is not type(self.teacher.unet):
            raise StillroomError(
                f"student.init '{root}' is a {type(unet).__name__}, the teacher a "
                f"{type(self.teacher.unet).__name__}",
                "initialise from a student of this teacher",
            )
        return unet

    def extra_roles(self) -> dict[str, Role]:
        return {}

    # -- data ------------------------------------------------------------------------------------
    def image_size(self) -> int:
        if self.recipe.data.image_size:
            return self.recipe.data.image_size
        factor = 1
        if self.teacher.vae is not None:
            factor = 2 ** (len(self.teacher.vae.config.block_out_channels) - 1)
        return self.teacher.image_size * factor

    def dataset(self):
        from stillroom.plugins.diffusion.data import Prompts, load_image_dataset

        channels = (
            self.teacher.vae.config.in_channels if self.teacher.vae is not None else self.teacher.channels
        )
        data = load_image_dataset(self.recipe.data.source, self.image_size(), channels)
        if self.needs_images and isinstance(data, Prompts):
            raise StillroomError(
                f"method '{self.name}' trains on images but data.source is a prompt file",
                "give an image folder with captions.jsonl",
            )
        return data

    def collate(self, items: list[tuple[Any, Any]]) -> dict[str, Any]:
        images = [x for x, _ in items]
        x0 = None
        if images[0] is not None:
            x0 = torch.stack(images).to(self.ctx.device)
            if self.teacher.vae is not None:
                with torch.no_grad():
                    x0 = (
                        self.teacher.vae.encode(x0).latent_dist.sample()
                        * self.teacher.vae.config.scaling_factor
                    )
        cond, uncond = self.condition([c for _, c in items])
        return {"x0": x0, "cond": cond, "uncond": uncond}

    def condition(self, conds: list[Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """UNet kwargs of the conditions (class indices or prompts) and of the unconditional input."""
        kind = self.teacher.conditioning
        if kind == "class":
            labels = torch.tensor([int(c) for c in conds], dtype=torch.long, device=self.ctx.device)
            return dm.class_cond(labels, self.teacher.null_class)
        if kind == "text":
            emb = dm.encode_prompts(
                self.teacher.text_encoder, self.teacher.tokenizer, [str(c) for c in conds]
            )
            return {"encoder_hidden_states": emb}, {
                "encoder_hidden_states": self.uncond_embedding.expand_as(emb)
            }
        return {}, {}

    def batch_size(self, batch: dict[str, Any]) -> int:
        for value in (batch["x0"], *batch["cond"].values()):
            if value is not None:
                return int(value.shape[0])
        raise StillroomError("an unconditional prompt-free batch has no size", "give images in data.source")

    # -- diffusion helpers -------------------------------------------------------------------------
    @property
    def abar(self) -> torch.Tensor:
        """a_t^2: alpha-bar of a VP schedule (what the DDPM-only formulas, e.g. AGD's x0 clamp, read)."""
        return self.a_t.square()

    @abar.setter
    def abar(self, abar: torch.Tensor) -> None:
        """Sets a VP schedule from its alpha-bar: a_t = sqrt(abar_t), s_t = sqrt(1 - abar_t)."""
        self.a_t, self.s_t = abar.sqrt(), (1 - abar).sqrt()

    def coeffs(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_t, s_t) shaped [B, 1, 1, 1]; t = -1 is the clean end (a = 1, s = 0)."""
        i, clean = t.clamp(min=0), t < 0
        a = torch.where(clean, torch.ones_like(self.a_t[i]), self.a_t[i])
        s = torch.where(clean, torch.zeros_like(self.s_t[i]), self.s_t[i])
        return a.view(-1, 1, 1, 1), s.view(-1, 1, 1, 1)

    def lcm_grid(self, n: int) -> list[int]:
        """LCM's N-point skipping-step grid, ascending: t_k = (k + 1) T/N - 1 on a VP schedule, (k + 1) T/N
        on a flow one, so that it ends at the noisiest timestep (``top``) when N divides T."""
        return [self.top - self.T + (k + 1) * (self.T // n) for k in range(n)]

    def velocity(self, unet, x: torch.Tensor, t: torch.Tensor, cond, uncond=None, guidance=None):
        """The output of a flow network at continuous times t in [0, 1] ([B]; its timestep input is T t),
        with CFG when ``guidance`` is given: the velocity v = eps - x0 of a flow teacher or student."""
        return dm.cfg_output(unet, x, self.T * t, cond, uncond or cond, guidance)

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        a, s = self.coeffs(t)
        return a * x0 + s * eps

    def x0_eps(self, unet, x: torch.Tensor, t: torch.Tensor, cond, uncond=None, guidance=None, clip=True):
        """(x0, eps) of a *teacher-parametrised* network (the teacher, a critic copied from it) at (x, t),
        with CFG when ``guidance`` is given, and x0 clipped as the teacher's DDIM sampler clips it.

        With ``clip_sample`` in the teacher's scheduler config (pixel-space DDPMs) x0_hat is clamped to
        [-r, r] and eps_hat re-derived from it, eps_hat = (x - alpha x0_hat) / sigma, as diffusers' DDIM
        step does with ``use_clipped_model_output=True`` (GLIDE's rule). Near zero SNR x0_hat =
        (x - sigma eps_hat) / alpha amplifies eps errors by 1 / alpha (2e4 at t = 999 of the cosine
        schedule): without the clamp a teacher step from there is noise, and with the clamp but the raw
        eps the 50-step sampler drifts (measured on the embedded teacher: FID-like 58 vs 12).
        ``clip=False`` gives the network's raw prediction, for losses that train it (a clamp there
        would zero the gradient of every clamped pixel).
        """
        out = dm.cfg_output(unet, x, t, cond, uncond or cond, guidance)
        a, s = self.coeffs(t)
        x0, eps = gen.to_x0_eps(out, x, a, s, self.teacher.prediction)
        if clip and self.clip_x0 is not None:
            x0 = x0.clamp(-self.clip_x0, self.clip_x0)
            eps = (x - a * x0) / s
        return x0, eps

    def student_x0_eps(self, unet, x: torch.Tensor, t: torch.Tensor, cond):
        """(x0, eps) of a *student-parametrised* network (``student.prediction``), never clipped."""
        out = unet(x, t, **dm.unet_kwargs(cond)).sample
        a, s = self.coeffs(t)
        return gen.to_x0_eps(out, x, a, s, self.student_prediction)

    def noise_shape(self, b: int) -> tuple[int, ...]:
        size = self.teacher.image_size
        return (b, self.teacher.channels, size, size)

    def generator(
        self, unet: torch.nn.Module | None = None, sampler: dict | None = None
    ) -> gen.FewStepGenerator:
        """The student's sampler around ``unet`` (the live student by default), without VAE decoding."""
        sampler = dict(sampler or self.sampler())
        sampler["hybrid"] = None
        return gen.FewStepGenerator(
            unet if unet is not None else self.student, sampler, (self.a_t, self.s_t), self.uncond_embedding
        )

    def student_sample(self, batch: dict[str, Any], k: int | None = None):
        """A sample of the student's sampler with *backward simulation* (DMD2, Yin et al. 2024):

        the state fed to step ``k`` (random when None) is produced by running the student's own first
        k steps without gradient, so a K-step student trains on its own intermediate states. Returns
        (x0_hat with gradient, k).
        """
        g = self.generator()
        b = self.batch_size(batch)
        x = torch.randn(self.noise_shape(b), device=self.ctx.device)
        if k is None:
            k = int(torch.randint(0, g.steps, ()).item())
        cond = batch["cond"]
        labels, hidden = cond.get("class_labels"), cond.get("encoder_hidden_states")
        with torch.no_grad():
            for j in range(k):
                x0, eps = g.denoise(j, x, labels, hidden)
                x = gen.ddim_step(x0, eps, g.s_a_next[j], g.s_s_next[j])
        x0, _ = g.denoise(k, x, labels, hidden)
        return x0, k

    # -- the student's sampler ----------------------------------------------------------------------
    def schedule(self) -> tuple[list[int], dict[str, Any] | None]:
        """(timesteps, boundary) of the student's sampler; default: trailing DDIM grid, no boundary."""
        return gen.ddim_timesteps(self.teacher.scheduler.config, self.recipe.student.steps), None

    def sampler(self) -> dict[str, Any]:
        timesteps, boundary = self.schedule()
        t = self.teacher
        out = {
            "steps": len(timesteps),
            "timesteps": timesteps,
            "guidance": None,
            "guidance_embed": False,
            "prediction": self.student_prediction,
            "boundary": boundary,
            "conditioning": t.conditioning,
            "num_classes": t.num_classes,
            "null_class": t.null_class,
            "image_size": t.image_size,
            "channels": t.channels,
            "latent": t.vae is not None,
            "hybrid": None,
        }
        spec = self.recipe.student
        if spec.hybrid_teacher_steps:
            out = gen.with_hybrid(
                out,
                self.recipe.teacher.path,
                self.top + 1,
                spec.hybrid_teacher_steps,
                self.hybrid_handover(timesteps),
                self.recipe.teacher.guidance,
                t.prediction,
                self.clip_x0,
            )
        return out

    def hybrid_handover(self, timesteps: list[int]) -> int:
        """Where the hybrid sampler's student takes over: one of the timesteps it was trained at below
        its first (default: its second). A 1-step student was trained only at its first timestep, so
        no handover below it is trained, and an untrained handover is refused rather than sampled."""
        trained = [int(t) for t in timesteps[1:]]
        handover = self.recipe.student.hybrid_handover or (trained[0] if trained else None)
        if handover not in trained:
            where = f"trained at {trained}" if trained else f"1 step, trained at t={timesteps[0]} only"
            raise StillroomError(
                f"hybrid handover {handover} is not a timestep the student was trained at ({where})",
                "train with student.steps >= 2 and leave student.hybrid_handover unset (its second "
                "timestep) or set it to one of its timesteps",
            )
        return handover

    # -- evaluation and saving ----------------------------------------------------------------------
    def evaluate(self, student: torch.nn.Module) -> dict[str, float]:
        """Image metrics of the student's sampler on a fixed class-balanced set (MNIST-shaped teachers)."""
        from stillroom.data import root

        t = self.teacher
        if t.conditioning != "class" or t.channels != 1 or t.image_size not in (28, 32):
            return {}
        if not (root() / "mnist_classifier").is_dir():
            return {}
        from stillroom.plugins.diffusion.metrics import evaluate_images, load_classifier

        n = self.recipe.data.eval_per_class
        labels = torch.arange(t.num_classes, device=self.ctx.device).repeat_interleave(n)
        gen_noise = torch.Generator().manual_seed(self.recipe.data.eval_seed)
        noise = torch.randn(self.noise_shape(len(labels)), generator=gen_noise).to(self.ctx.device)
        g = self.generator(student)
        images = torch.cat([g(noise[i : i + 250], labels[i : i + 250]) for i in range(0, len(labels), 250)])
        return evaluate_images(images.cpu(), labels.cpu(), load_classifier("cpu"))

    def save_student(self, student: torch.nn.Module, out_dir: Path) -> None:
        student.save_pretrained(out_dir / "unet", safe_serialization=True)
        self.teacher.scheduler.save_pretrained(out_dir / "scheduler")
        if self.teacher.text_encoder is not None:
            self.teacher.text_encoder.save_pretrained(out_dir / "text_encoder", safe_serialization=True)
            self.teacher.tokenizer.save_pretrained(out_dir / "tokenizer")
        if self.teacher.vae is not None:
            self.teacher.vae.save_pretrained(out_dir / "vae", safe_serialization=True)


NOT_ON_FLOW = {
    "epsilon": "x0 = (x - s eps) / a is undefined at its first step, t = T, where a = 0",
    "v_prediction": "v = a eps - s x0 inverts to x0 only on a VP schedule (a^2 + s^2 = 1)",
}


def student_prediction(choice: str, teacher_prediction: str, abar_last: float) -> str:
    """The student's parametrisation (Salimans & Ho 2022, sec. 4, "Parameterization and weighting").

    An epsilon-predicting student gives x0_hat = (z_t - sigma_t eps_hat) / alpha_t, whose error is the
    eps error times sigma_t / alpha_t: harmless on a few-hundred-step grid but fatal for the first step
    of a 1-4 step sampler when the schedule ends near zero SNR (1 / alpha_{T-1} = 2e4 for the cosine
    schedule), which is why the paper trains x-, v- or (x, eps)-predicting students. ``auto`` picks
    v = alpha_t eps - sigma_t x, i.e. x0_hat = alpha_t z_t - sigma_t v_hat, for an epsilon teacher whose
    last alpha is below 0.02 (amplification above 50); the student still starts from the teacher's
    weights, which are already close to a v-predictor wherever alpha_t is near 1.

    A flow teacher's student predicts its velocity (auto) or x0: an epsilon student has no x0 at its first
    step (a_T = 0 on a flow schedule), and v = alpha eps - sigma x0 inverts only where a^2 + s^2 = 1 (VP).
    """
    if teacher_prediction == "flow" and choice in NOT_ON_FLOW:
        raise StillroomError(
            f"student.prediction={choice} does not fit a flow-matching teacher: {NOT_ON_FLOW[choice]}",
            "leave student.prediction on auto (a velocity student) or set it to sample",
        )
    if choice != "auto":
        return choice
    if teacher_prediction == "epsilon" and abar_last**0.5 < 0.02:
        return "v_prediction"
    return teacher_prediction


def random_timesteps(b: int, low: int, high: int, device) -> torch.Tensor:
    """Uniform integer timesteps in [low, high)."""
    return torch.randint(low, high, (b,), device=device)


def score_distillation_loss(x0: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient with respect to x0 is ``grad / x0.numel()``: 0.5 mean((x0 - sg(x0 - grad))^2)."""
    target = (x0 - grad).detach()
    return 0.5 * torch.nn.functional.mse_loss(x0.float(), target.float(), reduction="mean")
