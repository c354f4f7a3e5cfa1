"""Diffusion-DPO on a distilled student (Wallace et al. 2023, "Diffusion Model Alignment Using Direct
Preference Optimization", eq. 14), with the distillation loss kept as a regulariser.

Each step the current student draws two samples per condition c, x^a = G_theta(z^a, c) and
x^b = G_theta(z^b, c); a ranking metric named in the recipe (``method.preference``, default the
embedded MNIST classifier's confidence p(c | x)) picks the winner x^w and the loser x^l. With
x^*_t = alpha_t x^* + sigma_t eps^* and the noise-prediction error of a network f

    e_f(x^*, t) = omega(lambda_t) ||eps^* - eps_f(x^*_t, t)||^2      (mean over pixels)

the Diffusion-DPO loss against the frozen reference eps_ref is

    L_DPO = -log sigmoid(-beta T (e_theta(x^w, t) - e_ref(x^w, t) - (e_theta(x^l, t) - e_ref(x^l, t))))

(``beta`` below is the paper's beta T). The reference is the frozen initial student
(``reference: initial``) or the distillation teacher with its guidance (``reference: teacher``).
The regulariser is the distillation loss of Luhman & Luhman 2021 ("Knowledge Distillation in
Iterative Generative Models"): L_KD = mean ||G_theta(z, c) - Phi_teacher(z, c)||^2, Phi the teacher's
``distill_teacher_steps``-step DDIM sampler with CFG from the same noise. The loss is
L = L_DPO + ``distill_weight`` L_KD.

Two departures from the paper, both because the model is a K-step student and not a many-step
denoiser. t is drawn from the student's own K timesteps (the only ones its samples depend on) rather
than U(0, T). omega(lambda_t) = sigma_t^2 / alpha_t^2 by default (``weighting: x0``), so each error is
the x0 error ||x^* - x0_f(x^*_t, t)||^2: at a one-step student's t = T - 1 the paper's omega = 1
(``weighting: epsilon``) scales the model's influence by alpha_t^2 / sigma_t^2 ~ 4e-5 and gives no signal.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch.nn import functional as F

from stillroom.core.errors import StillroomError
from stillroom.core.method import Role, StepOutput
from stillroom.plugins.diffusion import models as dm
from stillroom.plugins.diffusion.base import DiffusionMethod, DiffusionParams

Preference = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
PREFERENCES: dict[str, Preference] = {}


def register_preference(name: str, fn: Preference) -> None:
    """Adds a ranking metric ``fn(images [B, C, H, W] in [-1, 1], labels [B]) -> scores [B]``, higher wins."""
    PREFERENCES[name] = fn


@functools.cache
def _classifier() -> torch.nn.Module:
    from stillroom.plugins.diffusion.metrics import load_classifier

    return load_classifier("cpu")


def _classifier_logits(images: torch.Tensor) -> torch.Tensor:
    return _classifier()(images.float().cpu())


def classifier_confidence(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """p(c | x) of the embedded MNIST classifier for the requested class c."""
    probs = _classifier_logits(images).softmax(dim=1)
    return probs.gather(1, labels.cpu().view(-1, 1)).squeeze(1)


def classifier_margin(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Logit of the requested class minus the largest other logit."""
    logits = _classifier_logits(images)
    own = logits.gather(1, labels.cpu().view(-1, 1)).squeeze(1)
    return own - logits.scatter(1, labels.cpu().view(-1, 1), float("-inf")).max(dim=1).values


register_preference("classifier_confidence", classifier_confidence)
register_preference("classifier_margin", classifier_margin)


def diffusion_dpo_loss(err_w, err_w_ref, err_l, err_l_ref, beta: float) -> torch.Tensor:
    """-log sigmoid(-beta ((e_w - e_w_ref) - (e_l - e_l_ref))) per pair (Wallace et al. 2023, eq. 14)."""
    return -F.logsigmoid(-beta * ((err_w - err_w_ref) - (err_l - err_l_ref)))


def rank_pair(pair: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x^w, x^l) of two samples per condition, pair [2, B, ...] with scores [2, B] (ties: the first wins)."""
    a_wins = (scores[0] >= scores[1]).view(-1, *([1] * (pair.dim() - 2)))
    return torch.where(a_wins, pair[0], pair[1]), torch.where(a_wins, pair[1], pair[0])


class DistillDPOParams(DiffusionParams):
    preference: str = Field("classifier_confidence", description="ranking metric of the sample pairs")
    beta: float = Field(100.0, gt=0, description="the paper's beta T (per-pixel mean errors)")
    reference: Literal["initial", "teacher"] = Field("initial", description="frozen DPO reference")
    weighting: Literal["x0", "epsilon"] = Field(
        "x0", description="omega(lambda_t): sigma^2 / alpha^2 (x0 errors) or 1 (the paper's)"
    )
    distill_weight: float = Field(1.0, ge=0, description="weight of the distillation regulariser L_KD")
    distill_teacher_steps: int = Field(8, ge=1, description="teacher DDIM steps of the L_KD target")

    @field_validator("preference")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in PREFERENCES:
            raise ValueError(f"unknown preference metric '{name}' (known: {', '.join(sorted(PREFERENCES))})")
        return name


class DistillDPO(DiffusionMethod):
    name = "distill_dpo"
    description = "Diffusion-DPO on a distilled student's own ranked sample pairs, distillation loss kept"
    paper = "Wallace et al. 2023, Diffusion Model Alignment Using Direct Preference Optimization"
    Params = DistillDPOParams
    needs_images = False

    def extra_roles(self) -> dict[str, Role]:
        if self.recipe.student.init is None:
            raise StillroomError(
                "distill_dpo tunes a distilled student but student.init is not set",
                "set student.init=RUN/student (e.g. of a progressive run)",
            )
        if self.teacher.conditioning != "class":
            raise StillroomError(
                "distill_dpo ranks class-conditional samples; this teacher is not class-conditional",
                "use a class-conditional teacher such as embedded:mnist_teacher",
            )
        self.preference = PREFERENCES[self.params.preference]
        self.reference = copy.deepcopy(self.student).eval().requires_grad_(False)
        return {"reference": Role(self.reference, trainable=False)}

    def error(self, unet, x0, eps, t, batch, student: bool) -> torch.Tensor:
        """e_f = omega(lambda_t) mean ||eps - eps_f(x_t, t)||^2 per sample. With omega = sigma^2 / alpha^2
        that is the x0 error mean ||x0 - x0_f(x_t, t)||^2, read off the network's own x0: finite where
        alpha_t = 0 (t = T of a flow schedule, a one-step flow student's timestep)."""
        x_t = self.add_noise(x0, t, eps)
        if student:
            x0_f, eps_f = self.student_x0_eps(unet, x_t, t, batch["cond"])
        else:
            g = self.recipe.teacher.guidance
            x0_f, eps_f = self.x0_eps(unet, x_t, t, batch["cond"], batch["uncond"], g)
        if self.params.weighting == "x0":
            return ((x0.float() - x0_f.float()) ** 2).mean(dim=(1, 2, 3))
        return ((eps.float() - eps_f.float()) ** 2).mean(dim=(1, 2, 3))

    def loss(self, role, batch, step) -> StepOutput:
        labels = batch["cond"]["class_labels"]
        b = labels.shape[0]
        g = self.generator()
        with torch.no_grad():
            pair = torch.stack(
                [g(torch.randn(self.noise_shape(b), device=labels.device), labels) for _ in range(2)]
            )
            scores = torch.stack([self.preference(x, labels) for x in pair]).to(labels.device)
        x_w, x_l = rank_pair(pair, scores)
        t = g.timesteps[torch.randint(0, g.steps, (b,), device=labels.device)]
        eps_w, eps_l = torch.randn_like(x_w), torch.randn_like(x_l)
        ref_is_student = self.params.reference == "initial"
        ref = self.reference if ref_is_student else self.teacher.unet
        with torch.no_grad():
            ref_w = self.error(ref, x_w, eps_w, t, batch, ref_is_student)
            ref_l = self.error(ref, x_l, eps_l, t, batch, ref_is_student)
        err_w = self.error(self.student, x_w, eps_w, t, batch, True)
        err_l = self.error(self.student, x_l, eps_l, t, batch, True)
        dpo = diffusion_dpo_loss(err_w, ref_w, err_l, ref_l, self.params.beta).mean()
        metrics = {
            "dpo": dpo.item(),
            "reward_margin": (scores.max(0).values - scores.min(0).values).mean().item(),
            "preference": scores.mean().item(),
            "implicit_acc": ((err_w - ref_w) < (err_l - ref_l)).float().mean().item(),
        }
        loss = dpo
        if self.params.distill_weight > 0:
            kd = self.distill_loss(batch, g)
            loss = loss + self.params.distill_weight * kd
            metrics["distill"] = kd.item()
        return StepOutput(loss, metrics)

    def distill_loss(self, batch, g) -> torch.Tensor:
        """L_KD = mean ||G_theta(z, c) - Phi_teacher(z, c)||^2 (Luhman & Luhman 2021)."""
        labels = batch["cond"]["class_labels"]
        z = torch.randn(self.noise_shape(labels.shape[0]), device=labels.device)
        target = dm.teacher_sample(
            self.teacher,
            z,
            batch["cond"],
            batch["uncond"],
            self.params.distill_teacher_steps,
            self.recipe.teacher.guidance,
        )
        return F.mse_loss(g(z, labels).float(), target.float())
