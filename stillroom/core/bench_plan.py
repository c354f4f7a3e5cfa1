"""What a benchmark runs: targets (a model on a runtime) and the settings every target shares.

Plain JSON-able dataclasses, because each target is measured in its own fresh process (timing in
the process that just exported or loaded something else measures warm caches and leftover threads)
and the job travels to that process as a JSON file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stillroom.core.artifact import read_manifest
from stillroom.core.source import read_json


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


def student_card(artifact_dir: str | Path) -> dict[str, Any]:
    """The ``stillroom.json`` of the student an artifact was exported from ({} when it is not at hand).

    Its recipe names what a fair benchmark compares against: the teacher the student was distilled
    from and the data it was trained on (whose held-out split it is scored on).
    """
    source = read_manifest(Path(artifact_dir)).source
    candidates = [source.get(k) for k in ("model_dir", "student_dir", "path")]
    candidates += [str(Path(source[k]) / "student") for k in ("run_dir", "run") if source.get(k)]
    for where in filter(None, candidates):
        card = Path(where) / "stillroom.json"
        if card.is_file():
            return read_json(card)
    return {}
