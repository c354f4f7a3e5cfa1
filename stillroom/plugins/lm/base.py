"""What every causal-LM method shares: teacher/student/data sections, roles, targets, evaluation, saving.

A concrete method subclasses ``LMMethod`` and writes its ``loss``. Positions: logits at position i
predict token i + 1, so losses use ``logits[:, :-1]`` and ``loss_mask(batch)`` (1 where the label of
token i + 1 is not -100: prompts and padding never count).

Student construction (``student`` section):

- ``config``: overrides of the teacher's config (an explicit, smaller shape), ``init: random``;
- ``init: teacher-layers``: also copy embeddings, final norm, head and every k-th block from the
  teacher (needs the teacher's widths);
- ``path``: an existing pretrained compact model ("Well-Read Students Learn Better", Turc et al. 2019).

Guard: a student whose tokenizer or vocabulary size differs from the teacher's stops the run with one
line naming both; comparing logits over different vocabularies gives silently wrong results.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from stillroom.core import distributed
from stillroom.core.errors import StillroomError
from stillroom.core.method import Method, Params, Role
from stillroom.plugins.lm import data as textdata
from stillroom.plugins.lm import models

log = logging.getLogger(__name__)


class LMTeacher(Params):
    path: str = Field("embedded:lm_teacher", description="directory, embedded:NAME or hub id")
    cache: Literal["none", "topk"] = Field("none", description="topk: precompute the teacher's top-k once")
    k: int = Field(32, gt=0, description="teacher.cache=topk: log-probs kept per token")
    cache_batch: int = Field(8, gt=0, description="examples per teacher forward when building the cache")


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
    augment: Literal["none", "random-replace"] = Field(
        "none", description="noise on the training inputs (plugins/lm/augment.py); labels stay clean"
    )
    augment_p: float = Field(0.1, ge=0, lt=1, description="data.augment: fraction of tokens replaced")


class LMMethod(Method):
    """Base of causal-LM distillation methods (student and frozen teacher roles)."""

    family = "lm"
    Teacher = LMTeacher
    Student = LMStudent
    Data = LMData
    #: False for methods that only need teacher logits on the training data (the top-k cache works)
    needs_live_teacher: ClassVar[bool] = False

    teacher: Any = None
    cache: Any = None

    def build(self) -> dict[str, Role]:
        teacher, self.tokenizer = models.load_causal_lm(self.recipe.teacher.path, "teacher")
        teacher.eval().to(self.ctx.device)
        self.student = self._build_student(teacher).to(self.ctx.device)
        self.student.config.use_cache = False
        roles = {"student": Role(self.student, aux=self.aux_modules(teacher))}
        if self.recipe.teacher.cache == "topk":
            if self.needs_live_teacher:
                raise StillroomError(
                    f"method '{self.name}' needs the teacher in memory, not a logit cache",
                    "remove teacher.cache (use teacher.cache=none)",
                )
            if self.recipe.data.augment != "none":
                raise StillroomError(
                    "data.augment changes the inputs the teacher's top-k cache was built on",
                    "set data.augment=none or teacher.cache=none",
                )
            self.cache = self._open_cache(teacher)
            del teacher  # training runs on the cache alone
        else:
            self.teacher = teacher
            roles["teacher"] = Role(teacher, trainable=False)
        return roles

    def aux_modules(self, teacher) -> torch.nn.Module | None:
        """Extra trainable modules stepped with the student (hidden-state projections)."""
        return None

    def _build_student(self, teacher):
        spec = self.recipe.student
        if spec.path is not None:
            student, tokenizer = models.load_causal_lm(spec.path, "student")
            check_same_vocabulary(self.tokenizer, tokenizer, self.recipe.teacher.path, spec.path)
        else:
            student = models.student_from_teacher_config(teacher, spec.config)
            if spec.init == "teacher-layers":
                picked = models.init_from_teacher_layers(student, teacher, spec.layer_stride)
                log.info("student initialised from teacher blocks %s", picked)
        check_same_vocab_size(teacher, student, self.recipe.teacher.path, spec.path or "student.config")
        return student

    def _open_cache(self, teacher):
        from stillroom.plugins.lm import topk

        cfg = self.recipe
        meta = {
            "format_version": 1,
            "teacher": cfg.teacher.path,
            "vocab_size": int(teacher.config.vocab_size),
            "k": cfg.teacher.k,
            "temperature": self.cache_temperature(),
            "seq_len": cfg.data.seq_len,
            "examples": len(self.examples()),
            "data": topk.fingerprint(self.examples(), self.heldout()),
        }
        root = self.ctx.run_dir / "teacher_cache"
        if self.ctx.rank == 0:  # one process builds, the others wait and map the same files
            topk.open_or_build(
                root,
                meta,
                lambda: teacher,
                self.examples(),
                self.heldout(),
                self.pad_id,
                self.ctx.device,
                cfg.teacher.cache_batch,
            )
        distributed.barrier()
        return topk.TopKCache(root)

    def cache_temperature(self) -> float:
        """The temperature the top-k cache is built at (the method's distillation temperature)."""
        return float(getattr(self.params, "temperature", 1.0))

    # -- data ---------------------------------------------------------------------------------
    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return int(tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0))

    def examples(self):
        """The training examples (dict items), built once."""
        if not hasattr(self, "_examples"):
            cfg = self.recipe.data
            records = textdata.read_records(textdata.split_files(cfg.source, "train"))
            self._examples = textdata.lm_examples(self.tokenizer, records, cfg.seq_len, cfg.max_train_tokens)
        return self._examples

    def dataset(self):
        return _Indexed(self.examples())

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = textdata.pad_examples(items, self.pad_id)
        cfg = self.recipe.data
        if cfg.augment == "random-replace":
            from stillroom.plugins.lm.augment import random_replace

            vocab = int(self.student.get_output_embeddings().weight.shape[0])
            batch["input_ids"] = random_replace(batch, vocab, cfg.augment_p, self.ctx.seed)
        if self.cache is not None:
            batch.update(self.cache.rows(batch["index"], batch["input_ids"].shape[1]))
        return {k: v.to(self.ctx.device) for k, v in batch.items()}

    def heldout(self) -> torch.Tensor:
        """``[N, seq_len]`` held-out blocks (the valid split, else the tail of train)."""
        if not hasattr(self, "_heldout"):
            cfg = self.recipe.data
            files = textdata.split_files(cfg.source, "valid")
            records = textdata.read_records(files or textdata.split_files(cfg.source, "train"))
            stream = textdata.token_stream(self.tokenizer, records)
            stream = stream[: cfg.eval_tokens] if files else stream[-cfg.eval_tokens :]
            self._heldout = textdata.TokenBlocks(stream, cfg.seq_len).blocks
        return self._heldout

    # -- logits and targets ---------------------------------------------------------------------
    @staticmethod
    def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    @staticmethod
    def loss_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, L-1]: 1 where logits position i has a counted next-token label."""
        return (batch["labels"][:, 1:] != -100).long()

    def teacher_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return self.teacher(**self.model_inputs(batch)).logits

    def targets(
        self, batch: dict[str, torch.Tensor], student_logits: torch.Tensor, temperature: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(student, teacher)`` logits over positions [:, :-1] for the loss functions: the full
        vocabulary with a live teacher, the k + 1 cache bins (see ``topk.py``) without one."""
        if self.cache is None:
            return student_logits[:, :-1], self.teacher_logits(batch)[:, :-1]
        from stillroom.plugins.lm import topk

        if abs(temperature - self.cache.temperature) > 1e-9:
            raise StillroomError(
                f"the teacher cache holds log-probs at T={self.cache.temperature}, "
                f"the loss asks for T={temperature}",
                "delete RUN/teacher_cache to rebuild it",
            )
        rows = {k: batch[k][:, :-1] for k in ("topk_indices", "topk_logprobs", "topk_tail")}
        return topk.bins(student_logits[:, :-1], rows, temperature)

    def cross_entropy(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Next-token cross-entropy on the counted labels (position i predicts token i+1)."""
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            batch["labels"][:, 1:].reshape(-1),
            ignore_index=-100,
        )

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(self, student) -> dict[str, float]:
        from stillroom.plugins.lm.metrics import evaluate_lm

        blocks = self.heldout().to(self.ctx.device)
        top1 = self.cache.eval_top1.to(self.ctx.device) if self.cache is not None else None
        return evaluate_lm(
            student, blocks, self.recipe.data.eval_batch, teacher=self.teacher, teacher_top1=top1
        )

    def save_student(self, student, out_dir: Path) -> None:
        student.config.use_cache = True
        student.save_pretrained(out_dir, safe_serialization=True)
        student.config.use_cache = False
        self.tokenizer.save_pretrained(out_dir)


class _Indexed(torch.utils.data.Dataset):
    """Adds each item's dataset index (the teacher cache and response caches are keyed by it)."""

    def __init__(self, base) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.base[i], "index": i}


def check_same_vocabulary(teacher_tok, student_tok, teacher_name: str, student_name: str) -> None:
    """Distilling across different vocabularies silently compares unrelated tokens: refuse it."""
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        raise StillroomError(
            f"teacher '{teacher_name}' ({len(teacher_tok)} tokens) and student '{student_name}' "
            f"({len(student_tok)} tokens) have different vocabularies",
            "use a student with the teacher's tokenizer",
        )


def check_same_vocab_size(teacher, student, teacher_name: str, student_name: str) -> None:
    """Same tokenizer but differently sized output layers (e.g. a changed vocab_size): refuse too."""
    t, s = (
        int(teacher.get_output_embeddings().weight.shape[0]),
        int(student.get_output_embeddings().weight.shape[0]),
    )
    if t != s:
        raise StillroomError(
            f"teacher '{teacher_name}' predicts {t} tokens but student '{student_name}' predicts {s}",
            "give the student the teacher's vocab_size",
        )
