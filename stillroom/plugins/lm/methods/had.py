"""Hybrid Architecture Distillation for causal LMs (HAD: "Hybrid Architecture Distillation
Outperforms Teacher in Genomic Sequence Modeling", 2025): a student of a different architecture
than the teacher, aligned to the teacher's hidden states on visible tokens plus masked-token
reconstruction, trained together with the task objective (next-token prediction).

The student is a GPT-2 (``transformers`` ``GPT2LMHeadModel``) built from the Llama teacher's shape:
learned absolute positions instead of RoPE, LayerNorm with biases instead of RMSNorm, a GELU MLP
instead of SwiGLU, full multi-head attention instead of grouped-query attention. It is the most
different decoder the family's export path takes (the dynamo KV-cache graph serves every
``model_type``; the fused graph takes only Llama / Mistral / Qwen2), so export with ``fused: false``.
The paper's student is a linear-attention / attention hybrid; no such model exports here.
``student.config`` holds GPT2Config overrides (e.g. ``n_layer: 2``) and needs ``init: random``;
``student.path`` takes any pretrained causal LM with the teacher's vocabulary instead.

Masking. With probability ``mask_ratio`` each counted input token x_i (label != -100) is replaced by
a uniform random token (``augment.random_replace``, drawn from (seed, step, example indices), so a
resumed run masks alike); M = {i : x'_i != x_i} are the masked positions, V = {i counted : i not in
M} the visible ones. The teacher reads the clean x, the student the corrupted x'.

Reconstruction in a causal LM. The logits at position i see x'_<=i, never x_i itself once it is
masked, except through the corrupted x'_i at i. So "reconstruct the masked token" here means: the
student's LM head at the masked position i predicts the original token x_i from x'_<=i (a causal
denoising target, the left-context analogue of BERT's MLM), and that position carries no
next-token target. Every other counted position i keeps the next-token target x_{i+1}:

    L = CE + alpha * L_align + beta * L_rec

    CE      = 1/|V'| sum_{i in V'} -log q_s(x_{i+1} | x'_<=i),     V' = {i in V : x_{i+1} counted}
    L_align = 1/|P| sum_{(s, t) in P} 1/|V| sum_{i in V} d(W_s h_s^(s)(x')_i, h_t^(t)(x)_i)
    L_rec   = 1/|M| sum_{i in M} -log q_s(x_i | x'_<=i)

with d and the layer pairs P, projections W_s exactly as in ``hidden`` (mse, cosine or MI-alpha;
uniform pairs by default; W learned where the widths differ, an ``aux`` module never saved with the
student). ``mask_ratio = 0`` leaves CE + alpha * hidden-state matching. Unlike the paper we train the
three terms jointly from the first step instead of distilling first and fine-tuning after.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from stillroom.core.errors import StillroomError
from stillroom.core.method import StepOutput
from stillroom.plugins.lm.augment import random_replace
from stillroom.plugins.lm.methods.hidden import Hidden, HiddenObjective, features, hidden_distance


class HADParams(HiddenObjective):
    pairs: list[tuple[int | str, int | str]] | None = Field(
        None, description="[[student, teacher], ...] layer indices or module paths; default: uniform"
    )
    alpha: float = Field(1.0, ge=0, description="weight of the hidden-state alignment on visible tokens")
    beta: float = Field(1.0, ge=0, description="weight of the masked-token reconstruction")
    mask_ratio: float = Field(0.15, ge=0, lt=1, description="probability a counted input token is masked")


class HAD(Hidden):
    name = "lm_had"
    description = "GPT-2 student of a Llama teacher: CE + hidden alignment on visible + masked reconstruction"
    paper = "HAD: Hybrid Architecture Distillation Outperforms Teacher in Genomic Sequence Modeling (2025)"
    Params = HADParams

    def _build_student(self, teacher):
        spec = self.recipe.student
        if spec.path is not None:
            return super()._build_student(teacher)
        if spec.init != "random":
            raise StillroomError(
                "method lm_had builds a GPT-2 student, which cannot copy the teacher's blocks",
                "set student.init=random",
            )
        return gpt2_like(teacher.config, spec.config)

    def loss(self, role: str, batch, step: int) -> StepOutput:
        p = self.params
        cpu = {k: batch[k].cpu() for k in ("input_ids", "labels", "index")}
        vocab = int(self.student.get_output_embeddings().weight.shape[0])
        noisy = random_replace(cpu, vocab, p.mask_ratio, self.ctx.seed * 100_003 + step).to(
            batch["input_ids"].device
        )
        logits, s_feats = features(
            self.student, {**self.model_inputs(batch), "input_ids": noisy}, [s for s, _ in self.pairs]
        )
        with torch.no_grad():
            _, t_feats = features(self.teacher, self.model_inputs(batch), [t for _, t in self.pairs])
        terms = had_terms(logits, s_feats, t_feats, self.projections, batch, noisy, p)
        total = terms["ce"] + p.alpha * terms["align"] + p.beta * terms["rec"]
        return StepOutput(total, {k: v.item() for k, v in terms.items()})


def had_terms(logits, s_feats, t_feats, projections, batch, noisy, objective) -> dict[str, torch.Tensor]:
    """``ce``, ``align`` and ``rec`` of the module docstring for a student that read ``noisy``."""
    masked = noisy != batch["input_ids"]
    visible = (batch["labels"] != -100) & ~masked
    labels = batch["labels"][:, 1:].masked_fill(masked[:, :-1], -100)
    ce = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )
    align = sum(
        hidden_distance(proj(s), t, visible, objective)
        for proj, s, t in zip(projections, s_feats, t_feats, strict=True)
    ) / len(s_feats)
    rec_sum = F.cross_entropy(logits[masked].float(), batch["input_ids"][masked], reduction="sum")
    rec = rec_sum / masked.sum().clamp_min(1)
    return {"ce": ce, "align": align, "rec": rec}


def gpt2_like(teacher_config, overrides: dict):
    """A randomly initialised GPT-2 with the teacher's vocabulary, special ids, context, width, depth and
    heads, then ``overrides`` (GPT2Config fields, e.g. ``n_layer``) applied."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = teacher_config
    config = GPT2Config(
        vocab_size=c.vocab_size,
        n_positions=c.max_position_embeddings,
        n_embd=c.hidden_size,
        n_layer=c.num_hidden_layers,
        n_head=c.num_attention_heads,
        n_inner=getattr(c, "intermediate_size", None),
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
        tie_word_embeddings=c.tie_word_embeddings,
    )
    for key, value in overrides.items():
        if key not in config.to_dict() and key not in config.attribute_map:
            raise StillroomError(
                f"recipe key 'student.config.{key}' is not a field of GPT2Config",
                "use a GPT-2 config field such as n_layer, n_embd, n_head or n_inner",
            )
        setattr(config, key, value)
    return GPT2LMHeadModel(config)
