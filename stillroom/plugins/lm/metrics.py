"""Language-model quality: held-out perplexity and next-token top-1 agreement with a teacher."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def evaluate_lm(
    model, blocks: torch.Tensor, batch_size: int = 8, teacher=None, teacher_top1: torch.Tensor | None = None
) -> dict[str, float]:
    """Token-level perplexity exp(mean NLL) over ``blocks`` ([N, L] token ids, each predicting its
    own next tokens), and, with a teacher (a model, or its precomputed argmax ``teacher_top1``
    [N, L]), the fraction of positions whose argmax agrees with the teacher's."""
    nll_sum, count, agree = 0.0, 0, 0
    for start in range(0, blocks.shape[0], batch_size):
        ids = blocks[start : start + batch_size]
        logits = model(input_ids=ids).logits[:, :-1].float()
        target = ids[:, 1:]
        nll_sum += F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
        ).item()
        count += target.numel()
        if teacher is not None:
            t_top1 = teacher(input_ids=ids).logits[:, :-1].argmax(-1)
        elif teacher_top1 is not None:
            t_top1 = teacher_top1[start : start + batch_size, :-1]
        else:
            continue
        agree += (t_top1 == logits.argmax(-1)).sum().item()
    out = {"perplexity": math.exp(nll_sum / max(count, 1))}
    if teacher is not None or teacher_top1 is not None:
        out["top1_agreement"] = agree / max(count, 1)
    return out
