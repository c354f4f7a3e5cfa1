"""Offline teacher cache: the teacher's top-k next-token log-probs, computed once, memory-mapped.

With ``teacher.cache: topk`` every logit method trains without the teacher in memory (the
"offline" / "sparse" KD of e.g. Raman et al. 2023, "For Distillation, Tokens Are Not All You Need";
Anshumann et al. 2025, "Sparse Logit Sampling"). One pass over the training examples stores, per
position, the indices and log-probs of the teacher's k most likely tokens, plus the log of the
remaining *tail mass*:

    S = top-k(p),   log p(v) for v in S,   log r = log sum_{v not in S} p(v),   p = softmax(z_teacher / T)

**How the tail is handled.** The teacher's distribution over the k tokens is exact; what is lost is
how the tail mass r spreads over the other V - k tokens. Instead of renormalising the top-k (which
would claim the teacher puts zero mass on every other token and push the student's tail to zero) or
spreading r uniformly (which invents a distribution), both distributions are *coarse-grained* onto
the same k + 1 bins: the k cached tokens and one "everything else" bin,

    p_bins = (p(v_1), ..., p(v_k), r),   q_bins = (q(v_1), ..., q(v_k), sum_{v not in S} q(v)).

Every divergence is then computed between p_bins and q_bins. It is exact on the cached tokens,
matches the total tail mass, and by the data-processing inequality never exceeds the full-vocabulary
divergence; it ignores only how the student arranges mass *inside* its tail, which the data CE term
still trains. The bins are handed to the loss functions as ``T * log(bins)`` "logits", so every loss
in ``losses.py`` applies unchanged (``log_softmax(T * log b / T) = log b``).

Files (in ``RUN/teacher_cache/``, written into a temporary directory and renamed, so an interrupted
build is simply redone): ``indices.npy`` (int32 [N, L, k]), ``logprobs.npy`` (float16 [N, L, k]),
``tail.npy`` (float32 [N, L]), ``eval_top1.npy`` (int32 [M, L], the teacher's argmax on the held-out
blocks, for agreement) and ``meta.json`` (what the cache was built from; a mismatch rebuilds it).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stillroom.core.fsio import atomic_dir
from stillroom.plugins.lm.data import pad_examples

log = logging.getLogger(__name__)

TAIL_FLOOR = -50.0  # log of a tail mass indistinguishable from 0 (k covers the whole vocabulary)


def fingerprint(dataset, heldout: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for i in range(len(dataset)):
        digest.update(dataset[i]["input_ids"].numpy().astype(np.int64).tobytes())
    digest.update(heldout.numpy().astype(np.int64).tobytes())
    return digest.hexdigest()


class TopKCache:
    """A built cache, memory-mapped; ``bins`` turns a batch's rows into loss-ready pseudo-logits."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.meta = json.loads((self.root / "meta.json").read_text())
        self.indices = np.load(self.root / "indices.npy", mmap_mode="r")
        self.logprobs = np.load(self.root / "logprobs.npy", mmap_mode="r")
        self.tail = np.load(self.root / "tail.npy", mmap_mode="r")
        self.eval_top1 = torch.from_numpy(np.load(self.root / "eval_top1.npy").astype(np.int64))

    @property
    def temperature(self) -> float:
        return float(self.meta["temperature"])

    def rows(self, index: torch.Tensor, width: int) -> dict[str, torch.Tensor]:
        """The cached rows of examples ``index``, cut to ``width`` positions (CPU tensors)."""
        idx = index.tolist()
        return {
            "topk_indices": torch.from_numpy(
                np.stack([self.indices[i, :width] for i in idx]).astype(np.int64)
            ),
            "topk_logprobs": torch.from_numpy(
                np.stack([self.logprobs[i, :width] for i in idx]).astype(np.float32)
            ),
            "topk_tail": torch.from_numpy(np.stack([self.tail[i, :width] for i in idx]).astype(np.float32)),
        }


def bins(
    student_logits: torch.Tensor, batch: dict[str, torch.Tensor], temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coarse-grained ``(student, teacher)`` pseudo-logits ``T * log(bins)`` of shape [B, L, k + 1].

    The student's tail bin is the log-sum-exp of its log-probs outside the cached tokens (exact, no
    subtraction of nearly equal numbers); gradients flow through both the k bins and the tail.
    """
    idx = batch["topk_indices"]
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    q_top = log_q.gather(-1, idx)
    q_tail = torch.logsumexp(log_q.scatter(-1, idx, float("-inf")), dim=-1, keepdim=True)
    q_bins = torch.cat([q_top, q_tail.clamp_min(TAIL_FLOOR)], dim=-1)
    p_bins = torch.cat([batch["topk_logprobs"], batch["topk_tail"].unsqueeze(-1)], dim=-1)
    p_bins = p_bins - torch.logsumexp(p_bins, dim=-1, keepdim=True)  # float16 storage rounding
    return temperature * q_bins, temperature * p_bins


@torch.no_grad()
def build(
    root: Path,
    teacher,
    dataset,
    heldout: torch.Tensor,
    meta: dict[str, Any],
    pad_id: int,
    device: torch.device,
    batch_size: int = 8,
) -> TopKCache:
    """Runs the teacher once over ``dataset`` (dict items) and ``heldout`` and writes the cache."""
    k, temperature, seq_len = int(meta["k"]), float(meta["temperature"]), int(meta["seq_len"])
    n = len(dataset)
    with atomic_dir(Path(root)) as tmp:
        indices = np.lib.format.open_memmap(tmp / "indices.npy", "w+", np.int32, (n, seq_len, k))
        logprobs = np.lib.format.open_memmap(tmp / "logprobs.npy", "w+", np.float16, (n, seq_len, k))
        tail = np.lib.format.open_memmap(tmp / "tail.npy", "w+", np.float32, (n, seq_len))
        teacher.eval()
        for start in range(0, n, batch_size):
            items = [dataset[i] for i in range(start, min(n, start + batch_size))]
            batch = pad_examples(items, pad_id)
            ids, attn = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            log_p = F.log_softmax(
                teacher(input_ids=ids, attention_mask=attn).logits.float() / temperature, -1
            )
            values, top = log_p.topk(k, dim=-1)
            rest = torch.logsumexp(log_p.scatter(-1, top, float("-inf")), dim=-1).clamp_min(TAIL_FLOOR)
            width = ids.shape[1]
            stop = start + len(items)
            indices[start:stop, :width] = top.cpu().numpy().astype(np.int32)
            logprobs[start:stop, :width] = values.cpu().numpy().astype(np.float16)
            tail[start:stop, :width] = rest.cpu().numpy()
            if start // batch_size % 50 == 0:
                log.info("teacher cache: %d/%d examples", stop, n)
        for array in (indices, logprobs, tail):
            array.flush()
        del indices, logprobs, tail
        top1 = [
            teacher(input_ids=heldout[s : s + batch_size].to(device)).logits.argmax(-1).cpu()
            for s in range(0, heldout.shape[0], batch_size)
        ]
        np.save(tmp / "eval_top1.npy", torch.cat(top1).numpy().astype(np.int32))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    log.info("teacher top-%d cache of %d examples written to %s", k, n, root)
    return TopKCache(root)


def open_or_build(
    root: Path, meta: dict[str, Any], make_teacher, dataset, heldout, pad_id, device, batch_size: int = 8
) -> TopKCache:
    """Reuses the cache under ``root`` when it was built from the same teacher, data, k and T."""
    root = Path(root)
    if (root / "meta.json").is_file():
        try:
            if json.loads((root / "meta.json").read_text()) == meta:
                log.info("reusing teacher cache %s", root)
                return TopKCache(root)
        except json.JSONDecodeError:
            pass
        log.info("teacher cache %s was built from something else; rebuilding", root)
    teacher = make_teacher().to(device)
    cache = build(root, teacher, dataset, heldout, meta, pad_id, device, batch_size)
    del teacher
    return cache
