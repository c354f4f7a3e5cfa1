"""Token-level data augmentation of causal-LM training inputs (``data.augment``).

Distillation on augmented inputs lets the teacher label text the corpus does not hold (TinyBERT,
Jiao et al. 2020; Distiller, He et al. 2021, searches the augmentation together with the objective):

    random-replace:  x'_i = u_i ~ Uniform(vocabulary)  with probability p,  x_i otherwise

applied to the counted positions (labels != -100) of the *inputs* only: the next-token labels stay the
clean text, and a live teacher sees the same noisy inputs as the student, so the logit targets are
the teacher's predictions on the augmented text. The noise is a function of (seed, example indices),
so a resumed run draws the same noise as an uninterrupted one.
"""

from __future__ import annotations

import zlib

import torch


def random_replace(batch: dict[str, torch.Tensor], vocab_size: int, p: float, seed: int) -> torch.Tensor:
    """``input_ids`` with each counted token replaced by a uniform random token with probability p."""
    ids = batch["input_ids"]
    key = batch["index"].numpy().tobytes() if "index" in batch else ids.numpy().tobytes()
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key))
    hit = (torch.rand(ids.shape, generator=gen) < p) & (batch["labels"] != -100)
    noise = torch.randint(0, vocab_size, ids.shape, generator=gen, dtype=ids.dtype)
    return torch.where(hit, noise, ids)
