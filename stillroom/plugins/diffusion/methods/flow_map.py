"""Flow map distillation without data: FreeFlow (Tong, Ma, Xie & Jaakkola 2025, "Flow Map Distillation
Without Data", arXiv 2511.19428), its predictor and its corrector.

The teacher is a flow-matching model (``prediction == "flow"``): x_r = (1 - r) x0 + r eps, r in [0, 1]
(r = 1 is the prior N(0, I)), velocity v(x, r) = eps - x0, sampled by integrating dx/dr = v from r = 1
to 0. Its classifier-free-guided velocity is v_w = v(x, r, null) + w (v(x, r, y) - v(x, r, null)).
(The paper writes f = z + delta F with the velocity pointing to the data; here u = -F and v = -u_paper,
so every equation below is the paper's with both signs flipped.)

The student is the flow map *from the prior*, X_theta(z, r) = "where the teacher's ODE started at
z ~ N(0, I) at r = 1 is at time r", parametrised by a UNet u_theta copied from the teacher:

    X_theta(z, r) = z - (1 - r) u_theta(z, tau = 1000 (1 - r), y)

so X_theta(z, 1) = z for any network, and the one-step generator is X_theta(z, 0) = z - u_theta(z, 1000):
exactly a one-step "flow"-prediction student at timestep 1000 (``FewStepGenerator``), which the ONNX and
diffusers exporters unroll unchanged (and at initialisation, one Euler step of the teacher).

**Predictor** (the paper's prediction objective, eq. 7-9). X_theta is the teacher's flow map iff its
*generating velocity* is the teacher's velocity along the student's own trajectory (z is the only random
input, so no dataset is read and no image is ever noised):

    d/dr X_theta(z, r) = v_w(X_theta(z, r), r)       for all r in [0, 1],
    d/dr X_theta(z, r) = u_theta - (1 - r) d/dr u_theta(z, 1000 (1 - r), y)

trained as a regression onto a stop-gradient target (sg), r ~ U(0, 1], with the paper's per-sample
decay weight on the residual Delta_G = d/dr X_theta - v_w (dimension d = C H W, power k = ``decay_power``):

    L_pred(theta) = E_{z, y, r} w_G || u_theta(z, r) - sg( v_w(X_theta(z, r), r) + (1 - r) d/dr u_theta ) ||^2
    w_G = sg( 1 / (||Delta_G||^2 / d + eps)^k )

d/dr u_theta is a central finite difference of half-width ``fd_step`` in r (no gradient): forward-mode AD
does not reach PyTorch's CPU attention kernel (the paper offers the same discrete form).

**Corrector** (eq. 10-11, after variational score distillation). The predictor is self-referential: its
errors compound along r. The corrector pulls the *noising marginals* q_r of the student's one-step samples
x = X_theta(z, 0) onto the teacher's p_r by descending the integral KL  int_0^1 KL(q_r || p_r) dr. With
scores written as velocities of the linear path (s = -(x + (1 - r) v) / r) its gradient is, up to a
per-r weight the paper drops,

    grad_theta L_corr = E_{z, n, r}[ (d u_theta(z, 1000) / d theta)^T lambda sg(v_N(x_r, r) - v_w(x_r, r)) ]
    x_r = (1 - r) sg(x) + r n,  n ~ N(0, I),  r ~ LogitNormal(``corrector_r_mean``, ``corrector_r_std``)

i.e. the sample moves by +lambda (v_N - v_w): from where its own marginal flows toward the teacher's.
v_N, the student's marginal velocity, is unknown; an auxiliary network v_psi (the ``critic`` role, a
copy of the teacher as in DMD2) learns it by flow matching on detached student samples, stepping
``critic_updates`` times per student step:

    L_fake(psi) = E_{z, n, r} || v_psi((1 - r) sg(x) + r n, r, y) - (n - sg(x)) ||^2

The two objectives share a batch (the paper: 75% predictor, 25% corrector, ``corrector_fraction``) and
their gradients are joined with the adaptive weight (alpha = ``corrector_weight``; 0 is the predictor alone)

    lambda = alpha E||Delta_G|| / (E||v_N - v_w|| + eps),

    L = (1 / B) [ sum_{predictor rows} w_G ||u - sg(target)||^2 / d
                  + sum_{corrector rows} 2 lambda u . sg(v_N - v_w) / d ]

(the corrector term through ``score_distillation_loss``: the same gradient, whose value is not logged)
gives every row the gradient 2 w_G Delta_G / (B d) or 2 lambda (v_N - v_w) / (B d). The teacher's CFG in the
corrector applies only at r <= ``corrector_guidance_max`` (the paper's tighter guidance interval; above it,
the conditional velocity). The corrector starts after ``corrector_warmup`` predictor-only steps; v_psi
learns from the first step, so that it already models the student's samples then (a copy of the teacher
models the unguided teacher, and lambda would scale that CFG gap to full strength).

Reconstructed, not read from the paper's text (only secondary summaries of it were reachable here): the
eps of w_G (1e-3, MeanFlow's constant), the logit-normal's parameters (location 0.8, scale 1), v_psi being
conditional without CFG, and eq. 11 without any per-r weight. Only one-step students (``student.steps:
1``): a flow map from the prior has no state to start a second step from (the paper's step length delta
is 1 - r here, the UNet's timestep tau = 1000 delta).
"""

from __future__ import annotations

import copy

import torch
from pydantic import Field

from stillroom.core.errors import StillroomError
from stillroom.core.method import Phase, Role, StepOutput
from stillroom.plugins.diffusion.base import DiffusionParams, score_distillation_loss
from stillroom.plugins.diffusion.datafree import DataFreeMethod

DECAY_EPS = 1e-3  # eps of the predictor's decay weight (reconstructed: MeanFlow's adaptive-weight constant)


class FlowMapParams(DiffusionParams):
    fd_step: float = Field(5e-3, gt=0, le=0.05, description="half-width in r of the d/dr u finite difference")
    decay_power: float = Field(
        1.0,
        ge=0,
        le=2,
        description="k of the predictor's weight 1 / (||Delta_G||^2 / d + eps)^k (paper: 1 with a corrector)",
    )
    corrector_weight: float = Field(
        1.0, ge=0, description="alpha of the corrector's adaptive weight; 0: the predictor alone (no critic)"
    )
    corrector_fraction: float = Field(
        0.25, gt=0, lt=1, description="share of each batch given to the corrector"
    )
    corrector_warmup: int = Field(0, ge=0, description="predictor-only student steps before the corrector")
    corrector_r_mean: float = Field(
        0.8, description="location of the corrector's logit-normal r (favours noise)"
    )
    corrector_r_std: float = Field(1.0, gt=0, description="scale of the corrector's logit-normal r")
    corrector_guidance_max: float = Field(
        0.7, ge=0, le=1, description="the corrector's teacher uses CFG only at r <= this (guidance interval)"
    )
    critic_updates: int = Field(
        1, ge=1, description="flow-matching steps of the critic v_psi per student step"
    )
    critic_lr: float | None = Field(None, gt=0, description="critic learning rate (default: train.lr)")


def prior_flow_map(u: torch.Tensor, z: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """X(z, r) = z - (1 - r) u, r shaped [B, 1, 1, 1]."""
    return z - (1 - r) * u


def predictor_target(v_teacher: torch.Tensor, du_dr: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """sg target of u: v_w(X, r) + (1 - r) du/dr (so that dX/dr = u - (1 - r) du/dr = v_w at the optimum)."""
    return v_teacher + (1 - r) * du_dr


def per_sample(x: torch.Tensor, fn) -> torch.Tensor:
    """fn reduced over every dimension but the first: [B]."""
    return fn(x.float(), dim=tuple(range(1, x.dim())))


def decay_weight(residual: torch.Tensor, k: float) -> torch.Tensor:
    """w_G = 1 / (||Delta_G||^2 / d + eps)^k per sample (no gradient)."""
    return (per_sample(residual.detach() ** 2, torch.mean) + DECAY_EPS) ** -k


def adaptive_weight(alpha: float, delta_g: torch.Tensor, delta_n: torch.Tensor) -> torch.Tensor:
    """lambda = alpha E||Delta_G|| / (E||v_N - v_w|| + eps): the corrector's gradient at the predictor's."""
    norm = torch.linalg.vector_norm
    return alpha * per_sample(delta_g, norm).mean() / (per_sample(delta_n, norm).mean() + 1e-8)


def rows(cond: dict, part: slice) -> dict:
    return {k: v if v is None else v[part] for k, v in cond.items()}


class FlowMap(DataFreeMethod):
    name = "flow_map"
    description = (
        "data-free flow map distillation of a flow-matching teacher (FreeFlow predictor + corrector), 1 step"
    )
    paper = "Tong, Ma, Xie & Jaakkola 2025, Flow Map Distillation Without Data"
    Params = FlowMapParams
    teachers = ("flow",)
    student_predictions = ("flow",)

    def build(self):
        if self.recipe.student.steps != 1:
            raise StillroomError(
                f"flow_map trains the flow map from the prior, a one-step generator; got student.steps="
                f"{self.recipe.student.steps}",
                "set student.steps: 1",
            )
        if self.params.corrector_weight > 0 and self.recipe.train.batch_size < 2:
            raise StillroomError(
                "flow_map's corrector shares each batch with the predictor; train.batch_size is 1",
                "set train.batch_size >= 2 (or method.corrector_weight: 0)",
            )
        return super().build()

    def extra_roles(self):
        if self.params.corrector_weight == 0:
            return {}
        self.critic = copy.deepcopy(self.teacher.unet).train().requires_grad_(True)
        return {"critic": Role(self.critic, lr=self.params.critic_lr)}

    def correcting(self, step: int) -> bool:
        return self.params.corrector_weight > 0 and step >= self.params.corrector_warmup

    def phases(self, step):
        """The critic learns from step 0, so it models the student's samples when the corrector starts."""
        if self.params.corrector_weight > 0:
            return [Phase("critic", repeats=self.params.critic_updates), Phase("student")]
        return [Phase("student")]

    def u(self, z: torch.Tensor, r: torch.Tensor, cond) -> torch.Tensor:
        """u_theta(z, tau = 1000 (1 - r), y) for r shaped [B]."""
        return self.velocity(self.student, z, 1 - r, cond)

    def loss(self, role, batch, step) -> StepOutput:
        return self.critic_loss(batch) if role == "critic" else self.student_loss(batch, step)

    # -- the student: predictor rows, then corrector rows ----------------------------------------
    def student_loss(self, batch, step) -> StepOutput:
        b = self.batch_size(batch)
        n_c = min(max(1, round(self.params.corrector_fraction * b)), b - 1) if self.correcting(step) else 0
        pred, corr = slice(0, b - n_c), slice(b - n_c, b)
        u, target = self.predictor(rows(batch["cond"], pred), rows(batch["uncond"], pred), b - n_c)
        delta_g = (u - target).detach()
        mse = per_sample((u - target) ** 2, torch.mean)
        loss = (decay_weight(delta_g, self.params.decay_power) * mse).sum() / b
        metrics = {"predictor": mse.mean().item()}
        if n_c:
            u_c, delta_n = self.corrector(rows(batch["cond"], corr), rows(batch["uncond"], corr), n_c)
            lam = adaptive_weight(self.params.corrector_weight, delta_g, delta_n)
            loss = loss + 2 * score_distillation_loss(u_c, lam * delta_n) * n_c / b
            metrics.update(corrector_gap=delta_n.pow(2).mean().sqrt().item(), corrector_lambda=lam.item())
        return StepOutput(loss, metrics)

    def predictor(self, cond, uncond, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(u_theta(z, r) with gradient, its sg target) at r ~ U[h, 1 - h]."""
        z = torch.randn(self.noise_shape(b), device=self.ctx.device)
        h = self.params.fd_step
        r = h + (1 - 2 * h) * torch.rand(b, device=self.ctx.device)  # [h, 1 - h]: room for the difference
        rb = r.view(-1, 1, 1, 1)
        u = self.u(z, r, cond)
        with torch.no_grad():
            du_dr = (self.u(z, r + h, cond) - self.u(z, r - h, cond)) / (2 * h)
            x_r = prior_flow_map(u, z, rb)
            v = self.velocity(self.teacher.unet, x_r, r, cond, uncond, self.recipe.teacher.guidance)
        return u, predictor_target(v, du_dr, rb)

    def corrector(self, cond, uncond, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(u_theta(z, 1000) with gradient, v_N - v_w at its re-noised one-step sample)."""
        z = torch.randn(self.noise_shape(b), device=self.ctx.device)
        u = self.u(z, torch.zeros(b, device=self.ctx.device), cond)
        with torch.no_grad():
            x_r, r, _ = self.renoised(prior_flow_map(u, z, 0.0))
            v_fake = self.velocity(self.critic, x_r, r, cond)
            v_real = self.velocity(self.teacher.unet, x_r, r, cond, uncond, self.corrector_guidance(r))
        return u, v_fake - v_real

    def corrector_guidance(self, r: torch.Tensor) -> torch.Tensor | None:
        """The teacher's CFG scale per row: w in the guidance interval r <= r_max, 1 (conditional) above."""
        w = self.recipe.teacher.guidance
        return None if w is None else torch.where(r <= self.params.corrector_guidance_max, w, 1.0)

    def renoised(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_r = (1 - r) x + r n, r, n) with r ~ LogitNormal and n ~ N(0, I); x already detached."""
        p = self.params
        r = torch.sigmoid(p.corrector_r_mean + p.corrector_r_std * torch.randn(x.shape[0], device=x.device))
        n = torch.randn_like(x)
        rb = r.view(-1, 1, 1, 1)
        return (1 - rb) * x + rb * n, r, n

    # -- the critic v_psi: flow matching on the student's own samples -----------------------------
    def critic_loss(self, batch) -> StepOutput:
        b, cond = self.batch_size(batch), batch["cond"]
        z = torch.randn(self.noise_shape(b), device=self.ctx.device)
        with torch.no_grad():
            x = prior_flow_map(self.u(z, torch.zeros(b, device=self.ctx.device), cond), z, 0.0)
        x_r, r, n = self.renoised(x)
        loss = torch.nn.functional.mse_loss(self.velocity(self.critic, x_r, r, cond).float(), (n - x).float())
        return StepOutput(loss, {"critic_fm": loss.item()})
