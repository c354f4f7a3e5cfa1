"""What a runtime hands to bench and serve: a loaded language model or image generator.

Both carry the same identity fields (``name``, ``runtime``, ``device``, ``provider``) so a benchmark
row or a ``/v1/models`` entry reads the same whichever runtime produced it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stillroom.serve.lm_loop import Generation, LMBackend
from stillroom.serve.sampling import SamplingParams


@dataclass
class LanguageModel:
    """A causal LM behind the shared generation loop."""

    name: str
    runtime: str
    backend: LMBackend
    tokenizer: Any
    device: str = "cpu"
    provider: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    kind: str = "causal-lm"

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        for candidate in (tok.pad_token_id, tok.eos_token_id, 0):
            if candidate is not None:
                return int(candidate)
        return 0

    @property
    def eos_ids(self) -> frozenset[int]:
        eos = self.tokenizer.eos_token_id
        return frozenset() if eos is None else frozenset([int(eos)])

    def encode(self, text: str) -> list[int]:
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ids:  # an empty prompt starts from BOS/EOS, the document separator of the training data
            bos = self.tokenizer.bos_token_id
            ids = [int(bos if bos is not None else self.pad_id)]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def generate(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> Generation:
        """A not-yet-started generation (iterate it to stream, or call ``.run()``)."""
        return Generation(self.backend, prompts, params, self.pad_id)

    def full_logits(self, input_ids: np.ndarray) -> np.ndarray:
        return self.backend.full_logits(input_ids)


@dataclass
class ImageGenerator:
    """A K-step sampler: ``generate(noise, class_labels, ...)`` -> images [B, C, H, W] in [-1, 1]."""

    name: str
    runtime: str
    run: Any  # callable(noise, class_labels=None, encoder_hidden_states=None, guidance_scale=None) -> ndarray
    sampler: dict[str, Any]
    device: str = "cpu"
    provider: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    encode: Any = None  # text-conditional: callable(list[str]) -> encoder_hidden_states [B, L, D]
    kind: str = "generator"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        size = self.sampler.get("image_size", 28)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return int(self.sampler.get("channels", 1)), int(h), int(w)

    @property
    def num_classes(self) -> int | None:
        n = self.sampler.get("num_classes")
        return int(n) if n else None

    @property
    def conditioning(self) -> str:
        return str(self.sampler.get("conditioning") or ("class" if self.num_classes else "none"))

    def noise(self, batch: int, seed: int | None) -> np.ndarray:
        """Standard normal noise, float32; the same seed gives the same noise on every runtime."""
        return np.random.default_rng(seed).standard_normal((batch, *self.image_shape)).astype(np.float32)

    def generate(
        self,
        noise: np.ndarray,
        class_labels: np.ndarray | None = None,
        encoder_hidden_states: np.ndarray | None = None,
        guidance_scale: float | None = None,
    ) -> np.ndarray:
        out = self.run(
            noise,
            class_labels=class_labels,
            encoder_hidden_states=encoder_hidden_states,
            guidance_scale=guidance_scale,
        )
        return np.asarray(out, dtype=np.float32)
