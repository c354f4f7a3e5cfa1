"""Completions on the model thread: continuous batching of every request's choices.

One model thread drives the decode loop's ``Scheduler`` (``stillroom.plugins.lm.decode_loop``).
Between two decode steps it moves queued requests into the running batch while the batch has room
(``max_batch`` rows; a request's choices join together), so a request waits for a free row, not for a
whole batch to finish, and its prefill holds the running rows up for one model call. A request that
finds ``max_queue`` requests queued is refused: 429 with ``Retry-After``. A row whose client went away
(``job.cancelled``: a closed stream, a timeout) is cancelled and leaves the batch at the next step.

Static batching (``continuous=False``, and any backend that cannot regroup its cache) admits rows only
into an empty batch, which then waits up to ``max_wait_ms`` for company when the batch before it had
company (``batcher.FixedWindow``), as micro-batching did.

Text is produced by decoding a choice's whole token list after each step and sending the new part.
Two things are held back until more tokens arrive: a trailing U+FFFD (half of a multi-byte
character) and a tail that could still grow into a stop string. A matched stop string cuts the text
before it and stops that row; the other rows of the batch continue.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from stillroom.plugins.lm.decode_loop import Row, Scheduler
from stillroom.plugins.lm.runtime import LanguageModel
from stillroom.plugins.lm.sampling import SamplingParams
from stillroom.serve.server.batcher import FixedWindow, Job
from stillroom.serve.server.errors import ApiError, queue_full
from stillroom.serve.server.metrics import Metrics

log = logging.getLogger(__name__)

# a newcomers' prefill while rows run: at most this many padded tokens (how long it holds the running
# rows up), of which at most this share padding (rows of other lengths wait for the next step)
PREFILL_TOKENS = 512
MAX_PADDING = 0.25


class LMJob(Job):
    """One request: ``prompts[i]`` (token ids) and ``params[i]`` per choice i; events go to ``queue``.

    Events: ("delta", choice, text, logprobs) and ("done", choice, finish_reason, prompt_tokens,
    completion_tokens); ``logprobs`` (None unless the choice asked for them) lists (token id, log p,
    [(id, log p)] of the top k) of the tokens produced since the previous delta.
    """

    def __init__(self, prompts: list[list[int]], params: list[SamplingParams], stops: list[str]) -> None:
        super().__init__()
        self.prompts, self.params, self.stops = prompts, params, stops
        self.size = len(prompts)

    def rows(self) -> list[Row]:
        """One decode-loop row per choice, owned by the choice's ``ChoiceText``."""
        choices = enumerate(zip(self.prompts, self.params, strict=True))
        return [Row(prompt, params, ChoiceText(self, i)) for i, (prompt, params) in choices]


@dataclass(eq=False)
class ChoiceText:
    """What one choice of ``job`` has streamed so far (the ``owner`` of its row)."""

    job: LMJob
    index: int
    sent: int = 0
    done: bool = False
    logged: int = 0  # tokens whose logprobs went out

    def logprobs(self, row: Row) -> list[tuple[int, float, list[tuple[int, float]]]] | None:
        """The logprobs of the row's tokens not sent yet (None when the choice did not ask)."""
        if row.params.logprobs is None:
            return None
        pairs = zip(row.tokens[self.logged :], row.logprobs[self.logged :], strict=True)
        new = [(tok, lp, top) for tok, (lp, top) in pairs]
        self.logged = len(row.logprobs)
        return new

    def advance(self, model: LanguageModel, tokens: list[int], final: bool) -> tuple[str, bool]:
        """(new text to send, whether a stop string ended the choice)."""
        stops = self.job.stops
        text = model.decode(tokens)
        hits = [text.find(s, max(0, self.sent - len(s) + 1)) for s in stops]
        hits = [h for h in hits if h >= 0]
        if hits:
            end = min(hits)
            delta = text[self.sent : end] if end > self.sent else ""
            self.sent = max(self.sent, end)
            return delta, True
        end = len(text)
        if not final:
            while end > self.sent and text[end - 1] == "\ufffd":
                end -= 1
            hold = max((len(s) - 1 for s in stops), default=0)
            for k in range(min(hold, end - self.sent), 0, -1):
                if any(s.startswith(text[end - k : end]) for s in stops):
                    end -= k
                    break
        delta = text[self.sent : end]
        self.sent = end
        return delta, False

    def finish(self, row: Row, reason: str) -> None:
        self.done = True
        self.job.put(("done", self.index, reason, len(row.prompt), len(row.tokens)))


class LMWorker:
    """The model thread and its request queue (see the module doc); ``start`` / ``stop`` with the app."""

    def __init__(
        self,
        model: LanguageModel,
        metrics: Metrics,
        max_batch: int,
        max_queue: int,
        max_wait_ms: float,
        continuous: bool = True,
    ) -> None:
        self.model, self.metrics, self.max_queue = model, metrics, max_queue
        self.scheduler = Scheduler(
            model.backend, model.pad_id, max_batch, continuous, PREFILL_TOKENS, MAX_PADDING
        )
        self.window = FixedWindow(max_wait_ms / 1000.0)
        self.last_jobs = 1  # requests in the last static batch
        self.inbox: deque[LMJob] = deque()
        self.queued_rows = 0  # the rows of the requests in ``inbox``
        self.wake = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, name="stillroom-lm", daemon=True)

    def start(self) -> None:
        self.thread.start()

    async def stop(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify()
        await asyncio.to_thread(self.thread.join, 30)

    def submit(self, job: LMJob) -> None:
        """Queues ``job`` (on the event loop): 400 if it can never fit the batch, 429 if the queue is full."""
        most = self.scheduler.max_batch
        if job.size > most:
            raise ApiError(
                400,
                f"the request asks for {job.size} items; this server batches at most {most}",
                param="n",
                code="too_many_items",
            )
        with self.wake:
            if len(self.inbox) >= self.max_queue:
                raise queue_full()
            job.submitted = time.perf_counter()
            self.inbox.append(job)
            self.queued_rows += job.size
            self.metrics.queue(+1)
            self._count_waiting()
            self.wake.notify()

    # -- the model thread ---------------------------------------------------------------------------
    def _serve(self) -> None:
        scheduler = self.scheduler
        while True:
            with self.wake:
                while not (self.stopping or self.inbox or scheduler.rows or scheduler.waiting):
                    self.wake.wait()
                if self.stopping:
                    return
                self._wait_for_company()
                jobs = self._take()
            for job in jobs:
                scheduler.add(job.rows())
            for row in [*scheduler.rows, *scheduler.waiting]:
                if row.owner.job.cancelled:
                    row.cancel()
            try:
                news = scheduler.step()
            except Exception as err:  # a model failure answers the batch's requests; the server stays up
                self._fail(err)
                continue
            self._deliver(news)

    def _wait_for_company(self) -> None:
        """A static batch about to start waits for more requests (``FixedWindow``); lock held."""
        if self.scheduler.continuous or self.scheduler.rows or not self.inbox:
            return
        deadline = time.monotonic() + self.window.patience(len(self.inbox), self.last_jobs)
        while not self.stopping and self.queued_rows < self.scheduler.room:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.wake.wait(left)

    def _take(self) -> list[LMJob]:
        """Queued requests that fit the batch's room, in order; cancelled ones are dropped (lock held)."""
        room, taken, kept, dropped = self.scheduler.room, [], deque(), 0
        for job in self.inbox:
            if job.cancelled:
                dropped += 1
            elif not kept and job.size <= room:
                taken.append(job)
                room -= job.size
            else:
                kept.append(job)
        if taken or dropped:
            self.inbox = kept
            self.queued_rows = sum(job.size for job in kept)
            self.metrics.queue(-(len(taken) + dropped))
            now = time.perf_counter()
            for job in taken:
                job.taken = now
            if not self.scheduler.continuous and taken:
                self.last_jobs = len(taken)
        return taken

    def _count_waiting(self) -> None:
        """Publishes the rows waiting for a place: queued requests' and the scheduler's queue."""
        self.metrics.waiting(self.queued_rows + len(self.scheduler.waiting))

    def _deliver(self, news: list[Row]) -> None:
        """Each row's new text (or its end) to its request, and the step's metrics."""
        for row in news:
            text: ChoiceText = row.owner
            if text.done:
                continue
            delta, stopped = text.advance(self.model, row.tokens, row.done)
            finishing = stopped or row.done
            if delta or (finishing and row.params.logprobs is not None and text.logged < len(row.logprobs)):
                text.job.put(("delta", text.index, delta, text.logprobs(row)))
            if stopped:
                row.cancel()
                text.finish(row, "stop")
            elif row.done:
                text.finish(row, row.finish_reason)
        if self.scheduler.admitted:
            self.metrics.batch(len(self.scheduler.admitted))
        self.metrics.generated(tokens=sum(row.token is not None for row in news))
        self.metrics.running(self.scheduler.running)
        self._count_waiting()

    def _fail(self, err: Exception) -> None:
        log.exception("generation failed", exc_info=err)
        for job in dict.fromkeys(row.owner.job for row in self.scheduler.drop()):
            job.put(err)
        self.metrics.running(0)
        self._count_waiting()
