"""What the masked feature-distillation methods (``dmae``, ``had``) share: random patch masks, the
teacher's feature map as one token per patch, the masked-patch reconstruction loss, and the two
stages of their papers (masked distillation pre-training, then fine-tuning on the labels).

The teacher's last conv stage gives a G x G feature map; each of its positions is one P x P patch of
the image (P = image_size / G: 4 for the shipped 28px teacher with two 2x2 pools), so teacher tokens
and student tokens line up patch by patch. A mask M in {0, 1}^(G*G) hides exactly
round(mask_ratio * G^2) patches of each image, drawn uniformly at random (MAE's per-image shuffle).

For the first ``pretrain`` fraction of ``train.steps`` the student is trained on

    L_pre = L_rec + alpha * L_align

    L_rec   = 1 / |M| sum_{i in M} || D(h_i) - x_i ||^2 / (C P^2)        (MAE, He et al. 2022, eq. of
              their section 3: the mean squared error of the masked patches' pixels x_i)

with h_i the student's token i on the masked image, D a linear decoder and L_align the method's
feature alignment through a linear projection of h_i onto the teacher's channels. The rest of the
steps fine-tune the whole student on full images with cross-entropy, as both papers fine-tune their
pre-trained students. Decoder and projection are ``aux`` modules: checkpointed, never saved with the
student, so the student exports like any other of the family.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from stillroom.core.errors import StillroomError
from stillroom.core.method import Params, Role, StepOutput
from stillroom.plugins.classifier.base import ClassifierMethod
from stillroom.plugins.classifier.models import ConvClassifier


class MaskedParams(Params):
    mask_ratio: float = Field(0.75, gt=0, lt=1, description="fraction of each image's patches masked")
    alpha: float = Field(1.0, ge=0, description="weight of the feature alignment against reconstruction")
    pretrain: float = Field(
        0.5, ge=0, le=1, description="fraction of train.steps pre-training on masks; the rest fine-tunes"
    )


def random_patch_mask(batch: int, patches: int, ratio: float, device: torch.device) -> torch.Tensor:
    """bool [batch, patches], True where masked: exactly round(ratio * patches) per row, at random."""
    ranks = torch.rand(batch, patches, device=device).argsort(1).argsort(1)
    return ranks < round(ratio * patches)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, C*P*P]: the non-overlapping P x P patches in row-major order."""
    return F.unfold(images, patch, stride=patch).transpose(1, 2)


def pixel_mask(mask: torch.Tensor, grid: int, patch: int) -> torch.Tensor:
    """Patch mask [B, G*G] -> float [B, 1, G*P, G*P], 1 on the pixels of masked patches."""
    m = mask.float().view(-1, 1, grid, grid)
    return m.repeat_interleave(patch, 2).repeat_interleave(patch, 3)


def masked_mean(per_token: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i l_i / sum_i w_i over [B, N] losses and weights."""
    weights = weights.float()
    return (per_token * weights).sum() / weights.sum().clamp_min(1.0)


def reconstruction_loss(predicted: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, patch: int):
    """L_rec: mean squared error of the predicted pixels [B, N, C*P*P] over the masked patches."""
    error = (predicted.float() - patchify(images, patch).float()).pow(2).mean(-1)
    return masked_mean(error, mask)


def feature_distance(projected: torch.Tensor, teacher: torch.Tensor, visible: torch.Tensor, distance: str):
    """1 / (|V| c) sum_{i in V} sum_k d(W h_i - t_i)_k over visible tokens; d = |.| ("l1"), (.)^2 ("l2")."""
    diff = projected.float() - teacher.float()
    return masked_mean((diff.abs() if distance == "l1" else diff.pow(2)).mean(-1), visible)


def feature_map_tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """[B, C, G, G] -> [B, G*G, C], one token per position in row-major order."""
    return feature_map.flatten(2).transpose(1, 2)


class MaskedDistillation(ClassifierMethod):
    """Base of ``dmae`` and ``had``: they say how the student reads a masked image (``student_tokens``),
    what the teacher sees (``teacher_tokens``) and how the two are aligned (``alignment``)."""

    Params = MaskedParams

    @property
    def needs_teacher(self) -> bool:
        return False  # the teacher runs on every batch (masks differ per step), not once up front

    def build(self) -> dict[str, Role]:
        roles = super().build()
        self.teacher.requires_grad_(False)
        width = self.student_width()
        roles["student"].aux = nn.ModuleDict(
            {
                "project": nn.Linear(width, self.teacher_channels),
                "decode": nn.Linear(width, self.spec.channels * self.patch**2),
                **self.extra_aux(width),
            }
        )
        return roles

    def student_config(self):
        """Reads the teacher's grid first: the student's tokens must line up with its patches."""
        if not isinstance(self.teacher, ConvClassifier):
            raise StillroomError(
                f"{self.name}: the teacher is a {self.teacher.config.architecture}, without conv stages",
                "give a CNN classifier (ConvClassifier) as teacher.path",
            )
        size = self.spec.image_size
        with torch.no_grad():
            probe = self.teacher.conv(torch.zeros(1, self.spec.channels, size, size))
        self.teacher_channels, self.grid = probe.shape[1], probe.shape[-1]
        if size % self.grid:
            raise StillroomError(
                f"{self.name}: the teacher's {self.grid}x{self.grid} features do not tile {size}px images",
                "use a teacher whose pooling stages divide the image size",
            )
        self.patch = size // self.grid
        return super().student_config()

    def pretrain_steps(self) -> int:
        return round(self.params.pretrain * self.recipe.train.steps)

    # -- what each method says ----------------------------------------------------------------------
    def student_width(self) -> int:
        """Channels of the student's tokens."""
        raise NotImplementedError

    def extra_aux(self, width: int) -> dict[str, nn.Module]:
        """Further trainable modules of the pre-training objective (HAD's mask token)."""
        return {}

    def student_tokens(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The student's tokens h [B, G*G, width] on the masked images."""
        raise NotImplementedError

    def teacher_tokens(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The teacher's tokens [B, G*G, teacher channels] (no gradient)."""
        raise NotImplementedError

    def alignment(self, projected: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """L_align between the projected student tokens and the teacher's, both [B, G*G, channels]."""
        raise NotImplementedError

    # -- the objective ------------------------------------------------------------------------------
    def teacher_features(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's last conv stage as tokens, computed without gradient."""
        with torch.no_grad():
            return feature_map_tokens(self.teacher.to(images.device).conv(images)).float()

    def masked_image(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The image with its masked patches set to 0 (mid-grey after normalisation)."""
        return images * (1 - pixel_mask(mask, self.grid, self.patch))

    def loss(self, role: str, batch, step: int) -> StepOutput:
        images, labels = batch["images"], batch["labels"]
        if step >= self.pretrain_steps():
            ce = F.cross_entropy(self.student(images).float(), labels)
            return StepOutput(ce, {"ce": ce.item()})
        mask = random_patch_mask(len(images), self.grid**2, self.params.mask_ratio, images.device)
        aux = self.roles["student"].aux
        tokens = self.student_tokens(images, mask)
        align = self.alignment(aux["project"](tokens).float(), self.teacher_tokens(images, mask), mask)
        rec = reconstruction_loss(aux["decode"](tokens), images, mask, self.patch)
        return StepOutput(rec + self.params.alpha * align, {"rec": rec.item(), "align": align.item()})
