"""Generalized knowledge distillation (GKD; Agarwal et al. 2024, "On-Policy Distillation of Language
Models: Learning from Self-Generated Mistakes", ICLR 2024).

A student trained only on fixed sequences never sees its own mistakes (train/inference mismatch).
GKD trains on a mixture of sequences: for each batch, with probability ``lmbda`` the continuations of
the prompts are *sampled from the student* (on-policy, no gradient through sampling); otherwise they
come from the data, or, with ``seq_kd: true``, are sampled from the teacher (sequence-level KD). On
every continuation the token-level loss is the generalized JSD (Algorithm 1):

    L = E_{x, y ~ mixture} [ 1/|y| sum_n JSD(beta)(p_teacher(. | y_<n, x) || q_student(. | y_<n, x)) ]

Only generated tokens count: the prompt and everything after the first EOS are masked. For plain-text
data (no prompt/response records) the first ``prompt_tokens`` tokens of each block are the prompt.
Sampling uses torch's global RNG, restored on resume.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from stillroom.core.method import Params, StepOutput
from stillroom.plugins.lm import losses
from stillroom.plugins.lm.base import LMMethod
from stillroom.plugins.lm.data import pad_examples
from stillroom.plugins.lm.generate import sample


class GKDParams(Params):
    lmbda: float = Field(0.5, ge=0, le=1, description="probability of an on-policy (student-sampled) batch")
    beta: float = Field(0.5, ge=0, le=1, description="generalized JSD mixture weight (0: fKL, 1: rKL)")
    temperature: float = Field(1.0, gt=0, description="temperature of the divergence")
    seq_kd: bool = Field(False, description="off-policy batches use teacher samples instead of the data")
    prompt_tokens: int = Field(32, gt=0, description="plain-text data: prompt length taken from each block")
    max_new_tokens: int = Field(64, gt=0)
    sample_temperature: float = Field(1.0, ge=0, description="temperature of the rollouts (0: greedy)")


class GKD(LMMethod):
    name = "gkd"
    description = "on-policy distillation: generalized JSD on student-sampled (prob. lmbda) continuations"
    paper = "Agarwal et al. 2024, On-Policy Distillation of Language Models (GKD, ICLR 2024)"
    Params = GKDParams
    needs_live_teacher = True

    def loss(self, role: str, batch, step: int) -> StepOutput:
        p = self.params
        u = float(torch.rand(()))
        if u < p.lmbda:
            batch, source = self.rollout(self.student, batch), 2.0
        elif p.seq_kd:
            batch, source = self.rollout(self.teacher, batch), 1.0
        else:
            batch, source = self.truncate(batch), 0.0
        logits = self.student(**self.model_inputs(batch)).logits
        student, teacher = self.targets(batch, logits, p.temperature)
        jsd = losses.generalized_jsd(student, teacher, self.loss_mask(batch), p.temperature, beta=p.beta)
        tokens = float(self.loss_mask(batch).sum())
        return StepOutput(jsd, {"jsd": jsd.item(), "source": source, "tokens": tokens})

    def _prompt_lengths(self, batch) -> list[int]:
        lengths = batch["prompt_len"].tolist()
        total = batch["attention_mask"].sum(1).tolist()
        return [
            n if n > 0 else min(self.params.prompt_tokens, int(t) - 1)
            for n, t in zip(lengths, total, strict=True)
        ]

    def truncate(self, batch) -> dict[str, torch.Tensor]:
        """The data's own continuations, cut like a rollout: prompt + up to max_new_tokens tokens."""
        items = []
        for row, n in enumerate(self._prompt_lengths(batch)):
            width = int(batch["attention_mask"][row].sum())
            stop = min(width, n + self.params.max_new_tokens)
            ids = batch["input_ids"][row, :stop].cpu()
            labels = batch["labels"][row, :stop].cpu().clone()
            labels[:n] = -100
            items.append({"input_ids": ids, "labels": labels, "prompt_len": n})
        return self._pad(items)

    def rollout(self, model, batch) -> dict[str, torch.Tensor]:
        """Continuations sampled from ``model`` for each prompt (prompts of equal length together)."""
        lengths = self._prompt_lengths(batch)
        items: list[dict[str, Any] | None] = [None] * len(lengths)
        for n in sorted(set(lengths)):
            rows = [i for i, m in enumerate(lengths) if m == n]
            prompts = batch["input_ids"][rows, :n]
            ids, generated = sample(
                model,
                prompts,
                self.params.max_new_tokens,
                self.params.sample_temperature,
                self.tokenizer.eos_token_id,
                self.pad_id,
            )
            for j, row in enumerate(rows):
                labels = torch.where(generated[j] > 0, ids[j], torch.full_like(ids[j], -100))
                items[row] = {"input_ids": ids[j].cpu(), "labels": labels.cpu(), "prompt_len": n}
        return self._pad(items)

    def _pad(self, items) -> dict[str, torch.Tensor]:
        return {k: v.to(self.ctx.device) for k, v in pad_examples(items, self.pad_id).items()}
