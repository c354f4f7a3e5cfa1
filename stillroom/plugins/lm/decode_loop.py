"""The one LM generation loop: prefill once, then decode with a KV cache, on every runtime.

Bench, the server, export validation (greedy against PyTorch) and the demo all generate through
``Generation``; a backend only turns ids into logits (the ONNX Runtime engine,
``stillroom.plugins.lm.engine``, the torch and TensorRT backends of ``runtime``), so stopping,
sampling, padding and timing behave the same whichever runtime is measured.

A batch of prompts is left-padded to a common length so the newest token of every row sits in the
last column. ``attention_mask`` marks real tokens (1) and padding (0); position ids count real tokens
only (``cumsum(mask) - 1``), so a padded row is computed exactly as it would be alone. After the
prefill each step feeds one token per row, appends a 1 to the mask and advances each row's position.
The mask is allocated once at its final width and handed to the backend as a growing view, and the
backend is told that width (``new_cache(batch, capacity)``) so it can preallocate the cache.

The loop only sees a backend (``LMBackend``) that turns ids + mask + positions + cache into the last
position's logits and the next cache; what the cache *is* (numpy arrays, device buffers bound with
IOBinding, a transformers ``Cache``) is the backend's business. Rows stop on a stop token, on their
own ``max_tokens`` or when cancelled (a streaming client went away, a stop string matched); the batch
ends when every row has stopped.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from stillroom.plugins.lm.sampling import SamplingParams, choose_token


class LMBackend(Protocol):
    """What a runtime provides to the loop."""

    def new_cache(self, batch: int, capacity: int | None = None) -> Any:
        """An empty KV cache (past length 0) for ``batch`` rows that will hold up to ``capacity``
        positions (a hint: a backend may preallocate, or ignore it)."""

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache: Any
    ) -> tuple[np.ndarray, Any]:
        """Runs the model on ``input_ids`` [B, S] after ``cache``; returns (last logits [B, V], cache)."""

    def full_logits(self, input_ids: np.ndarray) -> np.ndarray:
        """Logits [B, L, V] of every position of unpadded ``input_ids`` [B, L] (quality metrics)."""


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), both int64 [B, max_len], prompts aligned to the right."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def prefill_positions(mask: np.ndarray) -> np.ndarray:
    """Position of each real token among its row's real tokens; padding gets 1 (as transformers)."""
    pos = np.cumsum(mask, axis=1) - 1
    return np.where(mask == 0, 1, pos).astype(np.int64)


@dataclass
class StepEvent:
    """One decoding step: per row the token it produced (None: none) and why it finished (None: not)."""

    step: int
    tokens: list[int | None]
    finished: list[str | None]


@dataclass
class Generation:
    """Iterate to run the loop step by step (streaming); ``outputs`` and timings fill in as it runs."""

    backend: LMBackend
    prompts: Sequence[Sequence[int]]
    params: Sequence[SamplingParams]
    pad_id: int
    outputs: list[list[int]] = field(init=False)
    finish_reasons: list[str | None] = field(init=False)
    ttft_s: float | None = field(init=False, default=None)
    total_s: float | None = field(init=False, default=None)
    steps: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.params):
            raise ValueError("one SamplingParams per prompt")
        self.outputs = [[] for _ in self.prompts]
        self.finish_reasons = [None] * len(self.prompts)
        self._cancelled: set[int] = set()
        self._rngs = [np.random.default_rng(p.seed) for p in self.params]

    def cancel(self, row: int) -> None:
        """Stops ``row`` before its next token (its finish reason stays as the caller set it)."""
        self._cancelled.add(row)

    def _pick(self, logits: np.ndarray, step: int) -> StepEvent:
        tokens: list[int | None] = []
        finished: list[str | None] = []
        for row, params in enumerate(self.params):
            if self.finish_reasons[row] is not None or row in self._cancelled:
                if self.finish_reasons[row] is None:
                    self.finish_reasons[row] = "cancelled"
                tokens.append(None)
                finished.append(None)
                continue
            token = choose_token(logits[row], params, self._rngs[row])
            if token in params.stop_token_ids and not params.ignore_eos:
                self.finish_reasons[row] = "stop"
                tokens.append(None)
                finished.append("stop")
                continue
            self.outputs[row].append(token)
            tokens.append(token)
            if len(self.outputs[row]) >= params.max_tokens:
                self.finish_reasons[row] = "length"
            finished.append(self.finish_reasons[row])
        return StepEvent(step, tokens, finished)

    def _done(self) -> bool:
        return all(r is not None or i in self._cancelled for i, r in enumerate(self.finish_reasons))

    def __iter__(self) -> Iterator[StepEvent]:
        start = time.perf_counter()
        ids, prompt_mask = left_pad(self.prompts, self.pad_id)
        batch, length = ids.shape
        capacity = length + max(p.max_tokens for p in self.params)
        mask = np.zeros((batch, capacity), dtype=np.int64)  # one more column per step, never reallocated
        mask[:, :length] = prompt_mask
        cache = self.backend.new_cache(batch, capacity)
        logits, cache = self.backend.forward(ids, prompt_mask, prefill_positions(prompt_mask), cache)
        positions = prompt_mask.sum(axis=1, keepdims=True)
        step = 0
        while True:
            event = self._pick(logits, step)
            if step == 0:
                self.ttft_s = time.perf_counter() - start
            self.steps = step + 1
            yield event
            if self._done():
                break
            step += 1
            feed = np.array([[t if t is not None else self.pad_id] for t in event.tokens], dtype=np.int64)
            mask[:, length] = 1
            length += 1
            logits, cache = self.backend.forward(feed, mask[:, :length], positions, cache)
            positions = positions + 1
        for row in self._cancelled:
            if self.finish_reasons[row] is None:
                self.finish_reasons[row] = "cancelled"
        self.total_s = time.perf_counter() - start

    def run(self) -> Generation:
        """Runs to the end (non-streaming) and returns itself."""
        for _ in self:
            pass
        return self
