"""Sequence-level KD (Kim & Rush 2016, "Sequence-Level Knowledge Distillation") in the spirit of DASD
(2025, distribution-aligned sequence distillation): the student is trained on responses the teacher
generated, rather than on the teacher's per-token distributions.

1. Generation, in stages: for every prompt, each stage samples ``samples`` responses at its own
   temperature, e.g. a low-temperature stage (T = 0.3: the teacher's confident modes) and a T = 1
   stage (its full distribution, diversity). Responses are written to ``RUN/seqkd/`` one chunk at a
   time (atomic files); an interrupted generation resumes at the first missing chunk, and each chunk
   is sampled from its own generator seeded by (seed, stage, chunk), so the result does not depend
   on where it was interrupted. The pass happens once: a resumed run reuses it.
2. Divergence-aware selection (optional, ``keep_fraction`` < 1): every response is cut into
   sentences (at tokens holding . ! ? or a newline) and scored by the mean over its sentences of

       r(s) = 1/|s| sum_{y_n in s} [log p_teacher(y_n | y_<n, x) - log q_student(y_n | y_<n, x)],

   computed with the initial student. High r means the teacher finds the sentences much more likely
   than the student does: what the student has most to learn. The ``keep_fraction`` best-scoring
   responses are kept (``RUN/seqkd/selected.json``).
3. Training: next-token cross-entropy on the kept responses (prompt and post-EOS tokens masked),
   optionally plus ``kd_ratio`` * forward KL to the teacher on the same tokens (Kim & Rush's
   word-level + sequence-level combination).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field
from safetensors.torch import load_file, save

from stillroom.core import distributed
from stillroom.core.fsio import write_bytes, write_json
from stillroom.core.method import Params, StepOutput
from stillroom.plugins.lm import losses
from stillroom.plugins.lm.base import LMMethod
from stillroom.plugins.lm.generate import sample

log = logging.getLogger(__name__)


class Stage(Params):
    temperature: float = Field(1.0, ge=0, description="sampling temperature (0: greedy)")
    samples: int = Field(1, gt=0, description="responses per prompt")


class SeqKDParams(Params):
    stages: list[Stage] = Field(default_factory=lambda: [Stage(temperature=0.3), Stage(temperature=1.0)])
    max_prompts: int | None = Field(512, gt=0, description="prompts drawn (seeded) from the data; None: all")
    prompt_tokens: int = Field(32, gt=0, description="plain-text data: prompt length taken from each block")
    max_new_tokens: int = Field(64, gt=0)
    gen_batch: int = Field(32, gt=0, description="prompts per generation call (one cached chunk)")
    keep_fraction: float = Field(1.0, gt=0, le=1, description="divergence-aware selection; 1 keeps all")
    kd_ratio: float = Field(0.0, ge=0, le=1, description="weight of word-level forward KL on the responses")
    temperature: float = Field(1.0, gt=0, description="temperature of the word-level KL term")


class SeqKD(LMMethod):
    name = "seqkd"
    description = "sequence-level KD: train on cached, staged-temperature teacher responses (+ selection)"
    paper = "Kim & Rush 2016, Sequence-Level Knowledge Distillation; DASD 2025"
    Params = SeqKDParams
    needs_live_teacher = True

    def build(self):
        roles = super().build()
        self.responses = self._responses()
        return roles

    # -- 1. generation ---------------------------------------------------------------------------
    def prompts(self) -> list[torch.Tensor]:
        examples = self.examples()
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(self.ctx.seed))
        order = order[: self.params.max_prompts] if self.params.max_prompts else order
        out = []
        for i in order.tolist():
            item = examples[i]
            n = item["prompt_len"] or min(self.params.prompt_tokens, item["input_ids"].numel() - 1)
            out.append(item["input_ids"][:n])
        return out

    def _responses(self) -> list[dict[str, torch.Tensor]]:
        root = self.ctx.run_dir / "seqkd"
        selected = root / "selected.json"
        if self.ctx.rank == 0 and not selected.is_file():  # one process generates, the others wait
            parts = self._generate(root)
            keep = self._select(parts)
            write_json(selected, {"kept": keep, "total": sum(len(p) for p in parts)})
        distributed.barrier()
        parts = [self._load(path) for path in self._part_paths(root)]
        flat = [item for part in parts for item in part]
        kept = json.loads(selected.read_text())["kept"]
        log.info("seqkd: training on %d of %d teacher responses", len(kept), len(flat))
        return [flat[i] for i in kept]

    def _part_paths(self, root: Path) -> list[Path]:
        chunks = -(-len(self.prompts()) // self.params.gen_batch)
        return [
            root / f"stage{s}-sample{k}-chunk{c:05d}.safetensors"
            for s, stage in enumerate(self.params.stages)
            for k in range(stage.samples)
            for c in range(chunks)
        ]

    def _generate(self, root: Path) -> list[list[dict[str, torch.Tensor]]]:
        prompts, p = self.prompts(), self.params
        device = self.ctx.device
        for path in self._part_paths(root):
            if path.is_file():
                continue
            stage_i = int(path.name.split("-")[0][len("stage") :])
            sample_i = int(path.name.split("-")[1][len("sample") :])
            chunk = int(path.stem.split("chunk")[1])
            gen = torch.Generator(device=device).manual_seed(
                self.ctx.seed * 1_000_003 + stage_i * 10_007 + sample_i * 101 + chunk
            )
            batch = prompts[chunk * p.gen_batch : (chunk + 1) * p.gen_batch]
            tensors: dict[str, torch.Tensor] = {}
            for n in sorted({int(x.numel()) for x in batch}):
                rows = [i for i, x in enumerate(batch) if x.numel() == n]
                ids, generated = sample(
                    self.teacher,
                    torch.stack([batch[i] for i in rows]).to(device),
                    p.max_new_tokens,
                    p.stages[stage_i].temperature,
                    self.tokenizer.eos_token_id,
                    self.pad_id,
                    generator=gen,
                )
                for j, row in enumerate(rows):
                    tensors[f"{row:05d}.ids"] = ids[j].cpu().contiguous()
                    tensors[f"{row:05d}.generated"] = generated[j].cpu().contiguous()
            write_bytes(path, save(tensors))  # atomic: a chunk file is complete or absent
            log.info("seqkd: generated %s", path.name)
        return [self._load(path) for path in self._part_paths(root)]

    @staticmethod
    def _load(path: Path) -> list[dict[str, torch.Tensor]]:
        tensors = load_file(str(path))
        rows = sorted({key.split(".")[0] for key in tensors})
        items = []
        for row in rows:
            ids, generated = tensors[f"{row}.ids"], tensors[f"{row}.generated"]
            end = int(generated.nonzero().max()) + 1 if generated.any() else ids.numel()
            labels = torch.where(generated > 0, ids, torch.full_like(ids, -100))[:end]
            items.append(
                {
                    "input_ids": ids[:end],
                    "labels": labels,
                    "prompt_len": int((generated == 0).long().cumprod(0).sum()),
                }
            )
        return items

    # -- 2. divergence-aware selection -------------------------------------------------------------
    @torch.no_grad()
    def _select(self, parts) -> list[int]:
        flat = [item for part in parts for item in part]
        if self.params.keep_fraction >= 1:
            return list(range(len(flat)))
        scores = [self.sentence_score(item) for item in flat]
        n = max(1, round(self.params.keep_fraction * len(flat)))
        order = sorted(range(len(flat)), key=lambda i: -scores[i])[:n]
        return sorted(order)

    @torch.no_grad()
    def sentence_score(self, item) -> float:
        """Mean over the response's sentences of the per-token teacher/student log-likelihood ratio."""
        ids = item["input_ids"][None].to(self.ctx.device)
        target = ids[0, 1:]
        t_lp = F.log_softmax(self.teacher(input_ids=ids).logits[0, :-1].float(), -1).gather(
            -1, target[:, None]
        )[:, 0]
        s_lp = F.log_softmax(self.student(input_ids=ids).logits[0, :-1].float(), -1).gather(
            -1, target[:, None]
        )[:, 0]
        ratio = (t_lp - s_lp).cpu()
        counted = (item["labels"][1:] != -100).nonzero().squeeze(1).tolist()
        sentences, current = [], []
        for pos in counted:
            current.append(float(ratio[pos]))
            if _ends_sentence(self.tokenizer.decode([int(target[pos])])):
                sentences.append(sum(current) / len(current))
                current = []
        if current:
            sentences.append(sum(current) / len(current))
        return sum(sentences) / len(sentences) if sentences else float("-inf")

    # -- 3. training ---------------------------------------------------------------------------------
    def dataset(self):
        return self.responses

    def loss(self, role: str, batch, step: int) -> StepOutput:
        p = self.params
        logits = self.student(**self.model_inputs(batch)).logits
        ce = self.cross_entropy(logits, batch)
        if p.kd_ratio == 0:
            return StepOutput(ce, {"ce": ce.item()})
        student, teacher = self.targets(batch, logits, p.temperature)
        kd = losses.forward_kl(student, teacher, self.loss_mask(batch), p.temperature)
        return StepOutput(p.kd_ratio * kd + (1 - p.kd_ratio) * ce, {"ce": ce.item(), "kd": kd.item()})


def _ends_sentence(piece: str) -> bool:
    return any(ch in piece for ch in ".!?\n")
