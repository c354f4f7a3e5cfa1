"""What every causal-LM method shares: teacher/student/data sections, roles, evaluation, saving.

A concrete method subclasses ``LMMethod`` and writes only its ``loss``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from stillroom.core import data as textdata
from stillroom.core import models
from stillroom.core.errors import StillroomError
from stillroom.core.method import Method, Params, Role

log = logging.getLogger(__name__)


class LMTeacher(Params):
    path: str = Field("embedded:lm_teacher", description="directory, embedded:NAME or hub id")


class LMStudent(Params):
    path: str | None = Field(None, description="an existing compact model to start from")
    config: dict[str, Any] = Field(default_factory=dict, description="overrides of the teacher's config")
    init: Literal["random", "teacher-layers"] = "teacher-layers"
    layer_stride: int | None = Field(None, gt=0, description="teacher-layers: copy every k-th block")


class LMData(Params):
    source: str = Field("embedded:shakespeare", description="file, directory or embedded:NAME")
    seq_len: int = Field(128, gt=1)
    max_train_tokens: int | None = Field(None, gt=0)
    eval_tokens: int = Field(8192, gt=0, description="held-out tokens for perplexity/agreement")
    eval_batch: int = Field(8, gt=0)


class LMMethod(Method):
    """Base of causal-LM distillation methods (student and frozen teacher roles)."""

    family = "lm"
    Teacher = LMTeacher
    Student = LMStudent
    Data = LMData

    def build(self) -> dict[str, Role]:
        teacher, self.tokenizer = models.load_causal_lm(self.recipe.teacher.path, "teacher")
        teacher.eval()
        self.teacher = teacher
        self.student = self._build_student(teacher)
        self.student.config.use_cache = False
        return {"student": Role(self.student), "teacher": Role(teacher, trainable=False)}

    def _build_student(self, teacher):
        spec = self.recipe.student
        if spec.path is not None:
            student, tokenizer = models.load_causal_lm(spec.path, "student")
            check_same_vocabulary(self.tokenizer, tokenizer, self.recipe.teacher.path, spec.path)
            return student
        student = models.student_from_teacher_config(teacher, spec.config)
        if spec.init == "teacher-layers":
            picked = models.init_from_teacher_layers(student, teacher, spec.layer_stride)
            log.info("student initialised from teacher blocks %s", picked)
        return student

    # -- data ---------------------------------------------------------------------------------
    def dataset(self):
        cfg = self.recipe.data
        stream = textdata.token_stream(self.tokenizer, textdata.read_records(textdata.split_files(cfg.source, "train")))
        if cfg.max_train_tokens:
            stream = stream[: cfg.max_train_tokens]
        return textdata.TokenBlocks(stream, cfg.seq_len)

    def collate(self, items: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        input_ids = torch.stack(items).to(self.ctx.device)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    def heldout(self) -> torch.Tensor:
        """``[N, seq_len]`` held-out blocks (the valid split, else the tail of train)."""
        if not hasattr(self, "_heldout"):
            cfg = self.recipe.data
            files = textdata.split_files(cfg.source, "valid")
            records = textdata.read_records(files or textdata.split_files(cfg.source, "train"))
            stream = textdata.token_stream(self.tokenizer, records)
            stream = stream[: cfg.eval_tokens] if files else stream[-cfg.eval_tokens:]
            self._heldout = textdata.TokenBlocks(stream, cfg.seq_len).blocks
        return self._heldout

    # -- logits -------------------------------------------------------------------------------
    def teacher_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return self.teacher(**batch).logits

    def cross_entropy(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Next-token cross-entropy (position i predicts token i+1)."""
        target = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100
        )

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(self, student) -> dict[str, float]:
        from stillroom.core.lm_metrics import evaluate_lm

        blocks = self.heldout().to(self.ctx.device)
        result = evaluate_lm(student, blocks, self.recipe.data.eval_batch, teacher=self.teacher)
        return result

    def save_student(self, student, out_dir: Path) -> None:
        student.config.use_cache = True
        student.save_pretrained(out_dir, safe_serialization=True)
        student.config.use_cache = False
        self.tokenizer.save_pretrained(out_dir)


def check_same_vocabulary(teacher_tok, student_tok, teacher_name: str, student_name: str) -> None:
    """Distilling across different vocabularies silently compares unrelated tokens: refuse it."""
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        raise StillroomError(
            f"teacher '{teacher_name}' ({len(teacher_tok)} tokens) and student '{student_name}' "
            f"({len(student_tok)} tokens) have different vocabularies",
            "use a student with the teacher's tokenizer",
        )
