"""The one LM generation loop: prefill, then decode with a KV cache, on every runtime, for a batch
that rows join and leave between steps (``Scheduler``) or a fixed one (``Generation``).

Bench, the server, export validation (greedy against PyTorch) and the demo all generate through this
loop; a backend only turns ids into logits (the ONNX Runtime engine, ``stillroom.plugins.lm.engine``,
the torch and TensorRT backends of ``runtime``), so stopping, sampling, padding and timing behave the
same whichever runtime is measured. What the cache *is* (numpy arrays, device buffers bound with
IOBinding, a transformers ``Cache``) is the backend's business.

**The batch.** Rows are left-padded to a common width so the newest token of every row sits in the
last column. ``attention_mask`` marks real tokens (1) and padding (0); position ids count real tokens
only (``cumsum(mask) - 1``), so a padded row is computed exactly as it would be alone. Each decode
step feeds one token per row, appends a 1 to the mask and advances each row's position. The mask is
allocated at the widest the batch can grow and handed to the backend as a growing view, and the
backend is told that width (``new_cache(batch, capacity)``) so it can preallocate the cache.

**Continuous batching** (iteration-level scheduling: Orca, Yu et al., OSDI 2022). ``Scheduler.step``
is one iteration: waiting rows are admitted while the batch has room and prefilled together in one
call, the running rows take one decode step, every row picks its token, and a row that finished (a
stop token, its ``max_tokens``, cancelled) gives up its place at once, to the next step's
newcomers. A newcomer's prefill delays the running rows by that one call, of at most
``prefill_tokens`` padded prompt tokens.

**Why one padded batch cache and not per-sequence slots.** Every graph takes one ``attention_mask``
[B, T] and one past length for the whole batch (Optimum's contract; the fused graph's
GroupQueryAttention gets one total length), so rows of different lengths can share a call only as a
padded batch: slots at per-row lengths (vLLM's pages) would need per-row lengths the graphs cannot
take. So the batch's rows are its places, right-aligned in one padded cache. A newcomer takes a
finished row's place: its prefilled cache is written over that row in place
(``RegroupingBackend.place_rows``), left-padded to the batch's width. When the newcomers are more
than the free places or longer than the batch, or free places (fed padding meanwhile) have cost
about as much compute as one copy of the cache, the backend builds a new cache instead
(``regroup_cache``): the rows still running and the newcomers, right-aligned at the longest row,
without the columns that are padding in every row. Padding never changes a row's tokens: position
ids, not columns, place them (a graph that rotates keys by cache column gets moved keys re-rotated,
``engine.FastLM``, and caps the columns a batch may reach, ``max_columns``). The price is attention
over padding columns, a free place's compute until it is taken, and a copy of the cache when the
batch is rebuilt.

A backend without ``regroup_cache`` (torch, TensorRT) batches statically: rows join only an empty
batch, and a finished row stays in it, fed padding, until every row has finished.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from stillroom.plugins.lm.sampling import SamplingParams, choose_token, penalize, top_logprobs


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


class RegroupingBackend(LMBackend, Protocol):
    """A backend that can also move rows between caches (continuous batching)."""

    # the most columns a batch may reach (a graph that places tokens by cache column), None: unbounded
    max_columns: int | None

    def regroup_cache(
        self, parts: Sequence[tuple[Any, Sequence[int], int]], width: int, capacity: int | None = None
    ) -> Any:
        """A new cache of the listed rows of each part ``(cache, rows, part_width)``, in order,
        right-aligned in ``width`` columns: a part's column j becomes ``j + width - part_width``
        (leading columns gained are zeroed; leading columns lost hold only padding of the rows kept)."""

    def place_rows(
        self,
        cache: Any,
        width: int,
        slots: Sequence[int],
        source: Any,
        rows: Sequence[int],
        source_width: int,
        capacity: int | None = None,
    ) -> Any:
        """``cache`` (``width`` columns) with ``rows`` of ``source`` written over its rows ``slots``,
        right-aligned as in ``regroup_cache`` (in place where the backend can); ``capacity``: the
        columns the batch may now reach, as for ``new_cache``."""


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


@dataclass(eq=False)
class Row:
    """One sequence: its prompt, how it samples and stops, and what it has produced so far
    (``owner`` is the caller's: the server keeps its request there)."""

    prompt: list[int]
    params: SamplingParams
    owner: Any = None
    tokens: list[int] = field(default_factory=list)
    token: int | None = None  # what the row's last step produced (None: no token)
    finish_reason: str | None = None  # "stop", "length" or "cancelled"
    cancelled: bool = False
    cached: int = 0  # the row's real columns in the batch cache
    # with params.logprobs: per produced token (log p(token), [(id, log p)] of the top params.logprobs)
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.prompt:
            raise ValueError("every prompt needs at least one token")
        self.rng = np.random.default_rng(self.params.seed)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Stops the row before its next token (a finished row keeps its finish reason)."""
        self.cancelled = True


class Scheduler:
    """Iteration-level batching of ``Row``s over one backend (see the module doc).

    ``add`` queues rows. Each ``step``:

    1. admits waiting rows in order while fewer than ``max_batch`` run and the batch stays within
       the backend's ``max_columns``; while rows run (they wait for it), the prefill holds at most
       ``prefill_tokens`` padded tokens, at most a ``max_padding`` share of them padding (its first
       row always goes; on a CPU a prefill costs about its padded tokens, batched or not);
    2. runs one decode step of the running rows and picks every row's token;
    3. rebuilds the batch for the next step (``_rebatch``): newcomers take finished rows' places in
       place when they fit, else the cache is regrouped; free places are compacted away once they
       have idled, in places x steps, as many times as the batch has rows (a regroup copies about
       what a step computes), or once the batch is more than twice as wide as its longest row.

    With ``continuous=False``, or a backend that cannot regroup its cache, rows join only an empty
    batch (static batching).
    """

    def __init__(
        self,
        backend: LMBackend,
        pad_id: int,
        max_batch: int,
        continuous: bool = True,
        prefill_tokens: int | None = None,
        max_padding: float | None = None,
    ) -> None:
        self.backend, self.pad_id = backend, pad_id
        self.max_batch, self.prefill_tokens, self.max_padding = max_batch, prefill_tokens, max_padding
        self.regroups = callable(getattr(backend, "regroup_cache", None))
        self.continuous = continuous and self.regroups
        self.max_columns: int | None = getattr(backend, "max_columns", None)
        self.waiting: deque[Row] = deque()
        self.rows: list[Row] = []  # the batch, in cache order (a finished row holds a free place)
        self.admitted: list[Row] = []  # the rows the last step prefilled
        self.cache: Any = None
        self.mask = np.zeros((0, 0), dtype=np.int64)  # [rows, capacity]
        self.width = 0  # the batch's columns in the cache
        self.idle = 0  # free places times steps since the batch was last rebuilt

    @property
    def running(self) -> int:
        """Rows of the batch still generating."""
        return sum(not row.done for row in self.rows)

    @property
    def room(self) -> int:
        """How many more rows ``add`` may queue for the next step (none while a static batch runs)."""
        if self.rows and not self.continuous:
            return 0
        return self.max_batch - self.running - len(self.waiting)

    def add(self, rows: Iterable[Row]) -> None:
        self.waiting.extend(rows)

    def step(self) -> list[Row]:
        """One iteration; returns the rows that got a token or finished (cancelled rows leave silently)."""
        for row in self.rows:
            if row.cancelled and not row.done:
                row.finish_reason = "cancelled"
        new, new_logits, new_cache, new_width = self._admit()
        news = self._pick(self.rows, self._decode()) + self._pick(new, new_logits)
        self._rebatch(new, new_cache, new_width)
        return news

    def drop(self) -> list[Row]:
        """Empties the batch and the queue (after a backend failure); returns the rows dropped."""
        dropped = list(dict.fromkeys([*self.rows, *self.admitted, *self.waiting]))
        self.waiting.clear()
        self.admitted = []
        self._set_batch([], None, 0)
        return dropped

    # -- one iteration ----------------------------------------------------------------------------
    def _admit(self) -> tuple[list[Row], np.ndarray | None, Any, int]:
        """Prefills the waiting rows that may join: (rows, their logits, their cache, its width)."""
        self.admitted = []
        if self.rows and not self.continuous:
            return [], None, None, 0
        live = [row for row in self.rows if not row.done]
        while self.waiting and len(live) + len(self.admitted) < self.max_batch:
            row = self.waiting[0]
            if row.cancelled:  # gone before it started
                self.waiting.popleft().finish_reason = "cancelled"
                continue
            if live and self.admitted and not self._joins_prefill(row):
                break  # the prefill is full, or the row's length is too far from the others': next step
            if (live or self.admitted) and not self._fits([*live, *self.admitted, row]):
                break  # the row would push the batch past its last column: it waits for rows to leave
            self.admitted.append(self.waiting.popleft())
        if not self.admitted:
            return [], None, None, 0
        ids, mask = left_pad([row.prompt for row in self.admitted], self.pad_id)
        # rows that join an empty batch become it: their prefill cache is preallocated for it
        capacity = None if live else self._capacity(self.admitted, ids.shape[1])
        cache = self.backend.new_cache(len(self.admitted), capacity)
        logits, cache = self.backend.forward(ids, mask, prefill_positions(mask), cache)
        for row in self.admitted:
            row.cached = len(row.prompt)
        return self.admitted, logits, cache, ids.shape[1]

    def _joins_prefill(self, row: Row) -> bool:
        """Whether ``row`` may join this step's prefill within ``prefill_tokens`` and ``max_padding``."""
        lengths = [len(r.prompt) for r in self.admitted] + [len(row.prompt)]
        padded = len(lengths) * max(lengths)
        padding = padded - sum(lengths)
        return (self.prefill_tokens is None or padded <= self.prefill_tokens) and (
            self.max_padding is None or padding <= self.max_padding * padded
        )

    def _decode(self) -> np.ndarray | None:
        """One decode step of the batch (finished rows are fed padding); None when no row runs."""
        if self.running == 0:
            return None
        feed = np.array([[self.pad_id if row.done else row.tokens[-1]] for row in self.rows], dtype=np.int64)
        positions = np.array([[row.cached] for row in self.rows], dtype=np.int64)
        self.mask[:, self.width] = 1
        self.width += 1
        logits, self.cache = self.backend.forward(feed, self.mask[:, : self.width], positions, self.cache)
        for row in self.rows:
            row.cached += 1
        return logits

    @staticmethod
    def _pick(rows: list[Row], logits: np.ndarray | None) -> list[Row]:
        if logits is None:
            return []
        news = []
        for row, row_logits in zip(rows, logits, strict=True):
            if row.done:
                continue
            row_logits = penalize(row_logits, row.tokens, row.params)
            token = choose_token(row_logits, row.params, row.rng)
            if token in row.params.stop_token_ids and not row.params.ignore_eos:
                row.token, row.finish_reason = None, "stop"
            else:
                row.tokens.append(token)
                row.token = token
                if row.params.logprobs is not None:
                    row.logprobs.append(top_logprobs(row_logits, token, row.params.logprobs))
                if len(row.tokens) >= row.params.max_tokens:
                    row.finish_reason = "length"
            news.append(row)
        return news

    def _rebatch(self, new: list[Row], new_cache: Any, new_width: int) -> None:
        """The batch for the next step: newcomers in, finished rows out (see the class doc)."""
        if not self.regroups:  # finished rows ride along until every row has finished
            if new:
                self._set_batch(new, new_cache, new_width)
            if all(row.done for row in self.rows):
                self._set_batch([], None, 0)
            return
        live = [i for i, row in enumerate(self.rows) if not row.done]
        free = [i for i, row in enumerate(self.rows) if row.done]
        joining = [i for i, row in enumerate(new) if not row.done]
        if not live and new and len(joining) == len(new):  # the newcomers are the batch, their cache its
            self._set_batch(new, new_cache, new_width)
            return
        if joining and len(joining) <= len(free) and all(self._fits_in_place(new[i]) for i in joining):
            slots = free[: len(joining)]
            capacity = self._room_for([*(self.rows[i] for i in live), *(new[i] for i in joining)])
            self.cache = self.backend.place_rows(
                self.cache, self.width, slots, new_cache, joining, new_width, capacity
            )
            for slot, i in zip(slots, joining, strict=True):
                self.rows[slot] = new[i]
                self.mask[slot] = 0
                self.mask[slot, self.width - new[i].cached : self.width] = 1
        elif joining or not live:
            self._regroup([(self.cache, self.rows, live, self.width), (new_cache, new, joining, new_width)])
            return
        live = [i for i, row in enumerate(self.rows) if not row.done]
        free = len(self.rows) - len(live)
        self.idle += free
        # compact when free places have cost about one copy of the batch, or padding outgrew the rows
        if (free and self.idle >= len(self.rows)) or self.width > 2 * max(self.rows[i].cached for i in live):
            self._regroup([(self.cache, self.rows, live, self.width)])

    def _fits(self, rows: list[Row]) -> bool:
        """Whether ``rows`` can share a batch within ``max_columns``: right-aligned at the longest,
        every row's last token stays inside (always, for a backend without a column limit)."""
        if self.max_columns is None:
            return True
        # after this step a running row holds one more column, a waiting one its prompt
        longest = max(row.cached + 1 if row.cached else len(row.prompt) for row in rows)
        return longest + max(row.params.max_tokens - len(row.tokens) for row in rows) <= self.max_columns

    def _fits_in_place(self, row: Row) -> bool:
        """Whether a newcomer can take a place right-aligned at the batch's width: its prompt inside,
        its last token within ``max_columns``."""
        last = self.width + row.params.max_tokens - len(row.tokens)
        return row.cached <= self.width and (self.max_columns is None or last <= self.max_columns)

    def _room_for(self, rows: list[Row]) -> int:
        """The batch's capacity once ``rows`` run in it: the mask grows (to twice the columns they
        need, within ``max_columns``) when they need more than it has."""
        capacity, needed = self.mask.shape[1], self._capacity(rows, self.width)
        if needed > capacity:
            capacity = self.width + 2 * (needed - self.width)
            capacity = min(capacity, self.max_columns) if self.max_columns else capacity
            self.mask = np.pad(self.mask, ((0, 0), (0, capacity - self.mask.shape[1])))
        return capacity

    def _regroup(self, parts: list[tuple[Any, list[Row], list[int], int]]) -> None:
        """A new batch of the rows ``kept`` of each part ``(cache, members, kept, width)``, right-aligned
        at the longest row (columns that are padding in every row are dropped)."""
        rows = [members[i] for _, members, kept, _ in parts for i in kept]
        width = max((row.cached for row in rows), default=0)
        sources = [(cache, kept, part_width) for cache, _, kept, part_width in parts if kept]
        cache = self.backend.regroup_cache(sources, width, self._capacity(rows, width)) if rows else None
        self._set_batch(rows, cache, width)

    def _set_batch(self, rows: list[Row], cache: Any, width: int) -> None:
        self.mask = np.zeros((len(rows), self._capacity(rows, width)), dtype=np.int64)
        for i, row in enumerate(rows):
            self.mask[i, width - row.cached : width] = 1
        self.rows, self.cache, self.width, self.idle = rows, cache, width, 0

    @staticmethod
    def _capacity(rows: list[Row], width: int) -> int:
        """The widest the batch grows before it is rebuilt: each row decodes at most its
        ``max_tokens`` minus the tokens it has."""
        return width + max((row.params.max_tokens - len(row.tokens) for row in rows), default=0)


@dataclass
class StepEvent:
    """One decoding step: per row the token it produced (None: none) and why it finished (None: not)."""

    step: int
    tokens: list[int | None]
    finished: list[str | None]


@dataclass
class Generation:
    """A fixed batch: every prompt admitted at once and prefilled in one call (but for rows that
    together would pass a fused graph's last column: they wait for others to finish), then decoded
    until every row has stopped. Iterate to run it step by step (streaming); ``outputs`` and timings
    fill in as it runs."""

    backend: LMBackend
    prompts: Sequence[Sequence[int]]
    params: Sequence[SamplingParams]
    pad_id: int
    rows: list[Row] = field(init=False)
    ttft_s: float | None = field(init=False, default=None)
    total_s: float | None = field(init=False, default=None)
    steps: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.params):
            raise ValueError("one SamplingParams per prompt")
        if not self.prompts:
            raise ValueError("a generation needs at least one prompt")
        self.rows = [
            Row(list(prompt), params) for prompt, params in zip(self.prompts, self.params, strict=True)
        ]

    @property
    def outputs(self) -> list[list[int]]:
        return [row.tokens for row in self.rows]

    @property
    def finish_reasons(self) -> list[str | None]:
        return [row.finish_reason for row in self.rows]

    def cancel(self, row: int) -> None:
        """Stops ``row`` before its next token (a finished row keeps its finish reason)."""
        self.rows[row].cancel()

    def __iter__(self) -> Iterator[StepEvent]:
        start = time.perf_counter()
        scheduler = Scheduler(self.backend, self.pad_id, max_batch=len(self.rows))
        scheduler.add(self.rows)
        step = 0
        while scheduler.rows or scheduler.waiting:
            news = set(scheduler.step())
            if step == 0:
                self.ttft_s = time.perf_counter() - start
            self.steps = step + 1
            yield StepEvent(
                step,
                [row.token if row in news else None for row in self.rows],
                [row.finish_reason if row in news else None for row in self.rows],
            )
            step += 1
        self.total_s = time.perf_counter() - start

    def run(self) -> Generation:
        """Runs to the end (non-streaming) and returns itself."""
        for _ in self:
            pass
        return self
