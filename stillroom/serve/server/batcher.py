"""Dynamic micro-batching: concurrent requests gathered into one model call.

One worker task takes the first waiting job, then keeps taking jobs until the batch holds
``max_batch`` items (a completion row, an image) or ``max_wait_ms`` has passed since the first job
arrived, and runs the batch on a single model thread. While a batch runs, new requests queue up, so
under load batches grow by themselves and an idle server adds at most ``max_wait_ms`` of latency.
A job that would overflow the batch waits for the next one; the queue is bounded (a full queue is a
429, not an unbounded backlog).

The wait is adaptive: when the previous batch held a single job and nothing else is queued, there is
no sign of concurrent traffic, so the batch runs at once instead of idling ``max_wait_ms`` (a lone
client would otherwise pay the wait on every request for nothing). As soon as two jobs share a batch
the server waits again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from stillroom.serve.server.errors import ApiError
from stillroom.serve.server.metrics import Metrics

log = logging.getLogger(__name__)


class Job:
    """Something to run in a batch; ``size`` items; results travel through ``queue`` (an asyncio.Queue)."""

    size: int = 1

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False

    def put(self, item: Any) -> None:
        """Thread-safe: hand a result (or event) to the waiting request handler."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class MicroBatcher:
    def __init__(
        self,
        run_batch: Callable[[list[Any]], None],
        max_batch: int,
        max_wait_ms: float,
        metrics: Metrics,
        max_queue: int = 256,
    ) -> None:
        self.run_batch, self.max_batch, self.max_wait = run_batch, max_batch, max_wait_ms / 1000.0
        self.metrics, self.max_queue = metrics, max_queue
        self.pending: asyncio.Queue | None = None
        self.carry: Job | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stillroom-model")
        self.task: asyncio.Task | None = None
        self.last_jobs = 1

    def start(self) -> None:
        self.pending = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._worker())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def submit(self, job: Job) -> None:
        if job.size > self.max_batch:
            raise ApiError(
                400,
                f"the request asks for {job.size} items; this server batches at most {self.max_batch}",
                param="n",
                code="too_many_items",
            )
        if self.pending.qsize() >= self.max_queue:
            raise ApiError(
                429, "the server is busy (request queue full); retry later", "server_busy", code="queue_full"
            )
        self.metrics.queue(+1)
        self.pending.put_nowait(job)

    def _take_nowait(self) -> Job | None:
        if self.carry is not None:
            job, self.carry = self.carry, None
            return job
        return None if self.pending.empty() else self.pending.get_nowait()

    async def _gather(self) -> list[Job]:
        first = self._take_nowait() or await self.pending.get()
        batch, size = [first], first.size
        wait = self.max_wait if self.last_jobs > 1 else 0.0
        deadline = time.monotonic() + wait
        while size < self.max_batch:
            job = self._take_nowait()
            if job is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self.pending.get(), left)
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
            self.metrics.queue(-len(batch))
            live = [job for job in batch if not job.cancelled]
            if not live:
                continue
            self.metrics.batch(sum(job.size for job in live))
            try:
                await loop.run_in_executor(self.executor, self.run_batch, live)
            except Exception as err:  # a model failure answers the batch; the server stays up
                log.exception("batch failed")
                for job in live:
                    job.put(err)
