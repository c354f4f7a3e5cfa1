"""What a benchmark runs: targets (a model on a runtime) and the settings every target shares.

Plain JSON-able dataclasses, because each target is measured in its own fresh process (timing in
the process that just exported or loaded something else measures warm caches and leftover threads)
and the job travels to that process as a JSON file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Target:
    """One row group of the report: ``spec`` (artifact dir, model dir, embedded:NAME) on ``runtime``."""

    name: str
    runtime: str
    spec: str
    role: str = "student"  # "student" | "teacher"
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.name} [{self.runtime}]"


@dataclass
class BenchSettings:
    batches: list[int] = field(default_factory=lambda: [1, 8])
    warmup: int = 2
    repeats: int = 10
    # token-by-token models (prompts, held-out text)
    prompt_tokens: int = 32
    new_tokens: int = 32
    eval_blocks: int = 16
    eval_seq_len: int = 64
    continuation_tokens: int = 24
    prompts: list[str] = field(default_factory=lambda: ["To be, or not to be,", "The king", "O Romeo,"])
    # image models (scored samples, grid)
    quality_samples: int = 200
    grid_images: int = 16
    seed: int = 0
    timeout_s: float = 1800.0
    # registered quality metrics run on every target; empty: the family's own ``metric``
    metrics: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)
