"""Divergences between a student's and a teacher's next-token distributions.

Every function takes ``student_logits`` and ``teacher_logits`` of shape ``[B, L, V]`` or ``[N, V]``,
an optional ``mask`` (``[B, L]`` or ``[N]``; 1 = position counts) and returns a 0-dim tensor: the
per-position divergence averaged over counted positions. Teacher logits are detached, so gradients
reach the student only. Computation is in float32 (log-softmax) whatever the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _masked_mean(per_position: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return per_position.mean()
    mask = mask.to(per_position.dtype).reshape(per_position.shape)
    return (per_position * mask).sum() / mask.sum().clamp_min(1.0)


def forward_kl(student_logits, teacher_logits, mask=None, temperature: float = 1.0) -> torch.Tensor:
    """Hinton et al. 2015, "Distilling the Knowledge in a Neural Network":

        L = T^2 * KL(p_T || q_T) = T^2 * sum_v p_T(v) [log p_T(v) - log q_T(v)],
        p_T = softmax(z_teacher / T),  q_T = softmax(z_student / T).

    The T^2 factor keeps gradient magnitudes comparable across temperatures.
    """
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    per_position = (log_p.exp() * (log_p - log_q)).sum(-1)
    return temperature**2 * _masked_mean(per_position, mask)
