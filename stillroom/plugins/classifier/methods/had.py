"""HAD: Hybrid Architecture Distillation (Yang, Chen, Huang, Duan, Cao, Zhou & He 2025, "HAD: Hybrid
Architecture Distillation Outperforms Teacher in Genomic Sequence Modeling", arXiv:2505.20836).

A compact student of another architecture than the teacher is pre-trained on masked inputs with two
tasks at once: its features of the *visible* tokens are aligned with the teacher's features of the
same tokens, and the *masked* tokens are reconstructed; then it is fine-tuned. Here the teacher is
the family's CNN and the student an MLP-Mixer over P x P patches (``models.MixerClassifier``), P
taken from the teacher's grid so that student token i and teacher token t_i (``masked.py``: the
teacher's last conv stage at patch i, computed on the full image) describe the same patch. The
student's patch embeddings of masked patches are replaced by a learned mask token e_[M] (as in
masked language modelling), the mixer runs, and with its output tokens h_i

    L = L_rec + alpha * L_align,    L_align = 1 / (|V| c) sum_{i in V} || W h_i - t_i ||^2

over the visible tokens V (W linear), L_rec the squared error of the masked patches' pixels from a
linear decoder (``masked.py``). After ``pretrain`` of the steps the mixer is fine-tuned on full
images with cross-entropy. The paper's student is a bidirectional Gated-Delta-Net + attention
hybrid over nucleotides and reconstructs masked nucleotides (a classification over A, C, G, T)
through cross-attention; this file keeps the objective and swaps in an image student: a mixer,
pixel regression and a linear decoder.
"""

from __future__ import annotations

import torch
from pydantic import Field, PositiveInt
from torch import nn

from stillroom.core.method import Params
from stillroom.plugins.classifier.masked import MaskedDistillation, feature_distance


class MixerStudent(Params):
    feature_dim: PositiveInt = Field(64, description="token width (and embedding size)")
    depth: PositiveInt = Field(2, description="mixer blocks")
    token_hidden: PositiveInt = Field(64, description="hidden width of the token-mixing MLPs")
    channel_hidden: PositiveInt = Field(128, description="hidden width of the channel-mixing MLPs")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout before the head while training")


class HAD(MaskedDistillation):
    name = "had"
    description = "MLP-mixer student of a CNN: visible-token alignment + masked-patch reconstruction, then CE"
    paper = "Yang et al. 2025, HAD: Hybrid Architecture Distillation Outperforms Teacher in Genomic ..."
    architecture = "MixerClassifier"
    Student = MixerStudent

    def student_config(self):
        config = super().student_config()  # sets self.patch from the teacher's grid
        return config.model_copy(update={"patch_size": self.patch})

    def student_width(self) -> int:
        return self.recipe.student.feature_dim

    def extra_aux(self, width: int) -> dict[str, nn.Module]:
        return {"mask_token": nn.Embedding(1, width)}

    def student_tokens(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        tokens = self.student.patch_tokens(images)
        mask_token = self.roles["student"].aux["mask_token"].weight[0]
        return self.student.mix(torch.where(mask[..., None], mask_token, tokens))

    def teacher_tokens(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.teacher_features(images)

    def alignment(self, projected: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return feature_distance(projected, teacher, ~mask, "l2")
