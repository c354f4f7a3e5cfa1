"""Flow map distillation without data: the predictor objective of FreeFlow (Tong, Ma, Xie & Jaakkola
2025, "Flow Map Distillation Without Data", arXiv 2511.19428).

The teacher is a flow-matching model (``prediction == "flow"``): x_r = (1 - r) x0 + r eps, r in [0, 1]
(r = 1 is the prior N(0, I)), velocity v(x, r) = eps - x0, sampled by integrating dx/dr = v from r = 1
to 0. Its classifier-free-guided velocity is v_w = v(x, r, null) + w (v(x, r, y) - v(x, r, null)).

The student is the flow map *from the prior*, X_theta(z, r) = "where the teacher's ODE started at
z ~ N(0, I) at r = 1 is at time r", parametrised by a UNet u_theta copied from the teacher:

    X_theta(z, r) = z - (1 - r) u_theta(z, tau = 1000 (1 - r), y)

so X_theta(z, 1) = z for any network, and the one-step generator is X_theta(z, 0) = z - u_theta(z, 1000):
exactly a one-step "flow"-prediction student at timestep 1000 (``FewStepGenerator``), which the ONNX and
diffusers exporters unroll unchanged (and at initialisation, one Euler step of the teacher).

X_theta is the teacher's flow map iff its *generating velocity* is the teacher's velocity along the
student's own trajectory (the paper's prediction objective; z is the only random input, so no dataset is
read and no image is ever noised):

    d/dr X_theta(z, r) = v_w(X_theta(z, r), r)       for all r in [0, 1],
    d/dr X_theta(z, r) = u_theta - (1 - r) d/dr u_theta(z, 1000 (1 - r), y)

which is trained as a regression onto a stop-gradient target (sg), with r ~ U(0, 1]:

    L(theta) = E_{z, y, r} || u_theta(z, r) - sg( v_w(X_theta(z, r), r) + (1 - r) d/dr u_theta(z, r) ) ||^2

Its zero is the residual d/dr X - v_w = 0. d/dr u_theta is a central finite difference of half-width
``fd_step`` in r (no gradient): forward-mode AD does not reach PyTorch's CPU attention kernel.

Not implemented: the paper's *corrector* (aligning the student's noising marginals with a learned
velocity of its own samples); this is the predictor alone. Only one-step students (``student.steps: 1``):
a flow map from the prior has no state to start a second step from.
"""

from __future__ import annotations

import torch
from pydantic import Field

from stillroom.core.errors import StillroomError
from stillroom.core.method import StepOutput
from stillroom.plugins.diffusion.base import DiffusionParams
from stillroom.plugins.diffusion.datafree import DataFreeMethod


class FlowMapParams(DiffusionParams):
    fd_step: float = Field(5e-3, gt=0, le=0.05, description="half-width in r of the d/dr u finite difference")


def prior_flow_map(u: torch.Tensor, z: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """X(z, r) = z - (1 - r) u, r shaped [B, 1, 1, 1]."""
    return z - (1 - r) * u


def predictor_target(v_teacher: torch.Tensor, du_dr: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """sg target of u: v_w(X, r) + (1 - r) du/dr (so that dX/dr = u - (1 - r) du/dr = v_w at the optimum)."""
    return v_teacher + (1 - r) * du_dr


class FlowMap(DataFreeMethod):
    name = "flow_map"
    description = "data-free flow map distillation of a flow-matching teacher (FreeFlow predictor), 1 step"
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
        return super().build()

    def u(self, z: torch.Tensor, r: torch.Tensor, cond) -> torch.Tensor:
        """u_theta(z, tau = 1000 (1 - r), y) for r shaped [B]."""
        return self.velocity(self.student, z, 1 - r, cond)

    def loss(self, role, batch, step) -> StepOutput:
        cond = batch["cond"]
        b = self.batch_size(batch)
        z = torch.randn(self.noise_shape(b), device=self.ctx.device)
        h = self.params.fd_step
        r = h + (1 - 2 * h) * torch.rand(b, device=self.ctx.device)  # [h, 1 - h]: room for the difference
        rb = r.view(-1, 1, 1, 1)
        u = self.u(z, r, cond)
        with torch.no_grad():
            du_dr = (self.u(z, r + h, cond) - self.u(z, r - h, cond)) / (2 * h)
            x_r = prior_flow_map(u, z, rb)
            v = self.velocity(self.teacher.unet, x_r, r, cond, batch["uncond"], self.recipe.teacher.guidance)
            target = predictor_target(v, du_dr, rb)
        loss = torch.nn.functional.mse_loss(u.float(), target.float())
        return StepOutput(loss, {"predictor": loss.item(), "du_dr": du_dr.abs().mean().item()})
