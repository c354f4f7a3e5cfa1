"""Dynamic micro-batching: concurrent requests gathered into one model call.

One worker task takes the first waiting job, then keeps taking jobs until the batch holds
``max_batch`` items (a completion row, an image) or its window closes, and runs the batch on a single
model thread. While a batch runs, new requests queue up, so under load batches grow by themselves.
A job that would overflow the batch waits for the next one; the queue is bounded (a full queue is a
429, not an unbounded backlog).

``run_batch`` may return a finishing step (encoding results, say); it runs on a second thread, in
order, so the model thread can start the next batch while the previous one is being finished.

How long a batch waits for company is the window's decision, never more than ``max_wait_ms`` after
its first job:

- ``FixedWindow`` (LMs batched statically, ``lm_worker``): up to ``max_wait_ms``, except when the
  previous batch held a single job and nothing else is queued: no sign of concurrent traffic, so
  the batch runs at once (a lone client would otherwise pay the wait on every request for nothing).
- ``ArrivalWindow`` (generators): waits only while waiting saves model time per item, which
  depends on the arrival rate and on how much of a model call is a fixed cost: a small CPU model
  whose time grows with the batch runs whatever is queued at once (requests that arrive meanwhile
  form the next batch), a model with a large fixed cost per call waits for a fuller batch, and a
  lone client never waits.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from stillroom.serve.server.errors import ApiError, queue_full
from stillroom.serve.server.metrics import Metrics

log = logging.getLogger(__name__)


class Job:
    """Something to run in a batch; ``size`` items; results travel through ``queue`` (an asyncio.Queue).

    ``submitted`` and ``taken`` (``time.perf_counter()``) are when the job was queued and when a
    batch took it.
    """

    size: int = 1

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.submitted = self.taken = 0.0

    def put(self, item: Any) -> None:
        """Thread-safe: hand a result (or event) to the waiting request handler."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class FixedWindow:
    """Wait up to ``max_wait`` seconds after the first job, unless the last batch held a single job."""

    def __init__(self, max_wait: float) -> None:
        self.max_wait = max_wait

    def arrived(self, now: float) -> None:
        """A job was submitted at ``now`` (``time.perf_counter()``)."""

    def ran(self, items: int, seconds: float) -> None:
        """The model ran a batch of ``items`` in ``seconds``."""

    def patience(self, items: int, last_jobs: int) -> float:
        """Seconds to wait for one more job, with ``items`` in the batch so far."""
        return self.max_wait if last_jobs > 1 else 0.0


class ArrivalWindow(FixedWindow):
    """Waits for one more job only while waiting saves model time per item (see the module doc).

    The model's time per batch is fitted as ``fixed + per_item * items`` (least squares over the
    last ``history`` batches; until batches of two sizes have run, ``fixed`` is 0: no waiting). The
    arrival rate is one over an exponential average of the gaps between submissions, each capped at
    ``max_gap`` so that one arrival after an idle hour does not swamp the average.

    Running ``s`` items now costs ``fixed / s + per_item`` a item; waiting ``w`` for ``rate * w``
    more items while the model idles costs ``(w + fixed) / (s + rate * w) + per_item``, which is
    less exactly when ``s < fixed * rate``: the batch holds fewer items than arrive during one fixed
    cost. Then it waits up to two typical gaps for the next job. A lone client never waits: its
    requests arrive at most once per model call, so ``fixed * rate < 1``.
    """

    def __init__(
        self, max_wait: float, history: int = 64, smoothing: float = 0.1, max_gap: float = 1.0
    ) -> None:
        super().__init__(max_wait)
        self.smoothing, self.max_gap = smoothing, max_gap
        self.gap = max_gap  # no rate seen yet: no waiting
        self.last_arrival: float | None = None
        self.runs: collections.deque[tuple[int, float]] = collections.deque(maxlen=history)
        self.fixed = 0.0

    def arrived(self, now: float) -> None:
        if self.last_arrival is not None:
            gap = min(now - self.last_arrival, self.max_gap)
            self.gap += self.smoothing * (gap - self.gap)
        self.last_arrival = now

    def ran(self, items: int, seconds: float) -> None:
        self.runs.append((items, seconds))
        sizes = [n for n, _ in self.runs]
        if min(sizes) == max(sizes):  # one batch size: the fixed part cannot be told apart
            return
        fit = statistics.linear_regression(sizes, [t for _, t in self.runs])
        self.fixed = max(fit.intercept, 0.0)

    def patience(self, items: int, last_jobs: int) -> float:
        worth_waiting = items * self.gap < self.fixed  # items < fixed * rate
        return 2.0 * self.gap if worth_waiting else 0.0


class MicroBatcher:
    def __init__(
        self,
        run_batch: Callable[[list[Any]], Callable[[], None] | None],
        max_batch: int,
        max_wait_ms: float,
        metrics: Metrics,
        max_queue: int = 256,
        window: FixedWindow | None = None,
    ) -> None:
        self.run_batch, self.max_batch, self.max_wait = run_batch, max_batch, max_wait_ms / 1000.0
        self.metrics, self.max_queue = metrics, max_queue
        self.window = window or FixedWindow(self.max_wait)
        self.pending: asyncio.Queue | None = None
        self.carry: Job | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stillroom-model")
        self.finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stillroom-finish")
        self.task: asyncio.Task | None = None
        self.last_jobs = 1

    def start(self) -> None:
        self.pending = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._worker())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.finisher.shutdown(wait=False, cancel_futures=True)

    def submit(self, job: Job) -> None:
        if job.size > self.max_batch:
            raise ApiError(
                400,
                f"the request asks for {job.size} items; this server batches at most {self.max_batch}",
                param="n",
                code="too_many_items",
            )
        if self.pending.qsize() >= self.max_queue:
            raise queue_full()
        self.metrics.queue(+1)
        job.submitted = time.perf_counter()
        self.window.arrived(job.submitted)
        self.pending.put_nowait(job)

    def _take_nowait(self) -> Job | None:
        if self.carry is not None:
            job, self.carry = self.carry, None
            return job
        return None if self.pending.empty() else self.pending.get_nowait()

    async def _gather(self) -> list[Job]:
        first = self._take_nowait() or await self.pending.get()
        batch, size = [first], first.size
        deadline = time.monotonic() + self.max_wait
        while size < self.max_batch:
            job = self._take_nowait()
            if job is None:
                wait = min(deadline - time.monotonic(), self.window.patience(size, self.last_jobs))
                if wait <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self.pending.get(), wait)
                except asyncio.TimeoutError:
                    break
            if size + job.size > self.max_batch:
                self.carry = job
                break
            batch.append(job)
            size += job.size
        self.last_jobs = len(batch)
        return batch

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            taken = time.perf_counter()
            self.metrics.queue(-len(batch))
            live = [job for job in batch if not job.cancelled]
            if not live:
                continue
            for job in live:
                job.taken = taken
            items = sum(job.size for job in live)
            self.metrics.batch(items)
            try:
                seconds = await loop.run_in_executor(self.executor, self._run, live)
            except Exception as err:  # a model failure answers the batch; the server stays up
                _fail(live, err)
                continue
            self.window.ran(items, seconds)

    def _run(self, jobs: list[Job]) -> float:
        """On the model thread: the batch (timed), then its finishing step handed to the finisher."""
        start = time.perf_counter()
        finish = self.run_batch(jobs)
        seconds = time.perf_counter() - start
        if finish is not None:
            self.finisher.submit(_finish, finish, jobs)
        return seconds


def _finish(finish: Callable[[], None], jobs: list[Job]) -> None:
    """Runs a batch's finishing step (finishing thread); a failure answers the batch."""
    try:
        finish()
    except Exception as err:
        _fail(jobs, err)


def _fail(jobs: list[Job], err: Exception) -> None:
    log.exception("batch failed", exc_info=err)
    for job in jobs:
        job.put(err)
