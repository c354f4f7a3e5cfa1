"""The candidate students: layers x hidden x heads x intermediate around the recipe's student.

A candidate is a Llama-family config (the teacher's, with these six fields overridden), so it is
built, trained, exported and served by the same code as the recipe's own student. The grid's
defaults come from the recipe's student and the teacher: depths 1 .. max(student, teacher), widths
1/2, 3/4 and 1 of the student's hidden size, the student's head count and half of it (key/value
heads kept at the teacher's ratio), and an MLP at the student's and at half its width ratio.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from stillroom.core.errors import StillroomError

FIELDS = (
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
)


@dataclass(frozen=True, order=True)
class Candidate:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int

    @property
    def name(self) -> str:
        return f"L{self.layers}-H{self.hidden}-A{self.heads}-I{self.intermediate}"

    def overrides(self) -> dict[str, int]:
        """``student.config`` overrides that build this shape from the teacher's config."""
        return {
            "num_hidden_layers": self.layers,
            "hidden_size": self.hidden,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.hidden // self.heads,
            "intermediate_size": self.intermediate,
        }

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}


def config_hash(config: Any, extra: dict[str, Any]) -> str:
    """A short hash of a model config (``to_dict()``, version fields dropped) and of ``extra``."""
    fields = {k: v for k, v in config.to_dict().items() if "version" not in k}
    text = json.dumps({"config": fields, **extra}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def of_config(config: Any) -> Candidate:
    """The candidate a Llama-family config describes (the recipe's student, the teacher)."""
    missing = [f for f in FIELDS if not hasattr(config, f)]
    if missing:
        raise StillroomError(
            f"search-student needs a Llama-family config; '{type(config).__name__}' lacks {missing[0]}",
            "use a llama, mistral or qwen2 teacher",
        )
    return Candidate(*(int(getattr(config, f)) for f in FIELDS))


def grid(
    student: Candidate,
    teacher: Candidate,
    layers: list[int] | None = None,
    hidden: list[int] | None = None,
    heads: list[int] | None = None,
    mlp_ratios: list[float] | None = None,
) -> list[Candidate]:
    """Every valid combination (head width even, for RoPE; key/value heads dividing the heads)."""
    layers = layers or list(range(1, max(student.layers, teacher.layers) + 1))
    hidden = hidden or sorted({student.hidden // 2, student.hidden * 3 // 4, student.hidden})
    heads = heads or sorted({max(1, student.heads // 2), student.heads})
    ratio = student.intermediate / student.hidden
    mlp_ratios = mlp_ratios or [ratio / 2, ratio]
    out = set()
    for n_layers in layers:
        for width in hidden:
            for n_heads in heads:
                kv = max(1, n_heads * teacher.kv_heads // teacher.heads)
                if width % n_heads or (width // n_heads) % 2 or n_heads % kv:
                    continue
                for r in mlp_ratios:
                    inner = max(8, int(round(width * r / 8)) * 8)
                    out.add(Candidate(n_layers, width, n_heads, kv, inner))
    if not out:
        raise StillroomError(
            "the candidate grid is empty", "give hidden sizes divisible by 2 x the head counts"
        )
    return sorted(out)
