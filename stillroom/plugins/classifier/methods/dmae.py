"""DMAE: Masked Autoencoders Enable Efficient Knowledge Distillers (Bai, Wang, Xiao, Wei, Wang, Yuille,
Zhou & Xie, CVPR 2023, arXiv:2208.12256).

MAE pre-training of the student with one extra term: the student's intermediate features on the
masked image, through a projection, are pulled towards the teacher's intermediate features. With
mask M (``mask_ratio`` of the patches), student tokens h_i, a linear projection W and teacher tokens
t_i (``masked.py``: one per patch, the teacher's last conv stage),

    L = L_rec + alpha * L_dist,    L_dist = 1 / (|V| c) sum_{i in V} || W h_i - t_i ||_1

over the visible patches V (the paper aligns the visible tokens its ViTs keep, and finds L1 the
best distance; ``distance: l2`` is its squared-error alternative). ``teacher_input: masked`` is the
paper's efficiency: the teacher, too, sees only the visible patches; ``full`` lets it see the whole
image. After ``pretrain`` of the steps the student is fine-tuned with cross-entropy (the paper's
second stage).

The student is the family's CNN; masking a CNN's input sets the masked patches to 0 (ViTs drop
them), and its last conv stage must have the teacher's G x G grid (as many pooling stages).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from stillroom.core.errors import StillroomError
from stillroom.core.method import Role
from stillroom.plugins.classifier.masked import (
    MaskedDistillation,
    MaskedParams,
    feature_distance,
    feature_map_tokens,
)


class DMAEParams(MaskedParams):
    distance: Literal["l1", "l2"] = Field("l1", description="L_dist per element: |.| (the paper's) or (.)^2")
    teacher_input: Literal["masked", "full"] = Field(
        "masked", description="what the teacher sees: the visible patches only (the paper) or the full image"
    )


class DMAE(MaskedDistillation):
    name = "dmae"
    description = "MAE pre-training of a CNN student on masked images + L1 to the teacher's features, then CE"
    paper = "Bai et al. 2023, Masked Autoencoders Enable Efficient Knowledge Distillers"
    Params = DMAEParams

    def build(self) -> dict[str, Role]:
        roles = super().build()
        size = self.spec.image_size
        with torch.no_grad():
            side = self.student.conv(torch.zeros(1, self.spec.channels, size, size)).shape[-1]
        if side != self.grid:
            raise StillroomError(
                f"dmae: the student's last conv map is {side}x{side}, the teacher's {self.grid}x{self.grid}",
                "give student.channels as many stages as the teacher has",
            )
        return roles

    def student_width(self) -> int:
        return self.recipe.student.channels[-1]

    def student_tokens(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return feature_map_tokens(self.student.conv(self.masked_image(images, mask)))

    def teacher_tokens(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        seen = self.masked_image(images, mask) if self.params.teacher_input == "masked" else images
        return self.teacher_features(seen)

    def alignment(self, projected: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return feature_distance(projected, teacher, ~mask, self.params.distance)
