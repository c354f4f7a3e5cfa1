"""The micro-batcher's gathering rules and the sampler's distribution, without a model."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from stillroom.serve.server.batcher import Job, MicroBatcher
from stillroom.serve.server.metrics import Metrics


class _Sized(Job):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size


def _run(scenario):
    return asyncio.run(scenario())


def test_batches_fill_up_to_max_batch_and_carry_the_overflow():
    batches: list[list[int]] = []

    def run_batch(jobs):
        batches.append([j.size for j in jobs])
        time.sleep(0.05)
        for j in jobs:
            j.put("done")

    async def scenario():
        batcher = MicroBatcher(run_batch, max_batch=4, max_wait_ms=30, metrics=Metrics("m"))
        batcher.start()
        batcher.last_jobs = 2  # as after concurrent traffic: the batcher waits for company
        jobs = [_Sized(s) for s in (1, 2, 3, 1)]
        for j in jobs:
            batcher.submit(j)
        await asyncio.gather(*(j.queue.get() for j in jobs))
        await batcher.stop()

    _run(scenario)
    assert batches == [[1, 2], [3, 1]]  # 1+2+3 > 4: the 3 waits for the next batch, joined by the 1


def test_a_lone_request_does_not_wait_but_concurrent_ones_do():
    timings: list[float] = []

    def run_batch(jobs):
        for j in jobs:
            j.put(time.monotonic())

    async def scenario():
        batcher = MicroBatcher(run_batch, max_batch=8, max_wait_ms=200, metrics=Metrics("m"))
        batcher.start()
        for _ in range(3):  # sequential single requests: no waiting
            job = _Sized(1)
            start = time.monotonic()
            batcher.submit(job)
            timings.append(await job.queue.get() - start)
        batcher.last_jobs = 2
        job = _Sized(1)
        start = time.monotonic()
        batcher.submit(job)
        waited = await job.queue.get() - start
        await batcher.stop()
        return waited

    waited = _run(scenario)
    assert max(timings) < 0.1 and waited >= 0.19


def test_oversized_and_queue_full_are_4xx():
    from stillroom.serve.server.errors import ApiError

    async def scenario():
        batcher = MicroBatcher(
            lambda jobs: None, max_batch=2, max_wait_ms=1, metrics=Metrics("m"), max_queue=1
        )
        batcher.pending = asyncio.Queue()  # not started: nothing drains the queue
        codes = []
        for size in (3, 1, 1):
            try:
                batcher.submit(_Sized(size))
            except ApiError as err:
                codes.append((err.status, (err.headers or {}).get("Retry-After")))
        return codes

    assert _run(scenario) == [(400, None), (429, "1")]  # images' 429 says when to retry, as LMs' does


def test_sampled_frequencies_follow_the_nucleus_distribution():
    from stillroom.plugins.lm.sampling import SamplingParams, choose_token, nucleus_probs

    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    params = SamplingParams(temperature=0.8, top_p=0.9)
    rng = np.random.default_rng(0)
    n = 20000
    counts = np.bincount([choose_token(logits, params, rng) for _ in range(n)], minlength=len(logits))
    expected = nucleus_probs(logits, 0.8, 0.9) * n
    assert counts[expected == 0].sum() == 0  # never outside the nucleus
    chi2 = (((counts - expected) ** 2)[expected > 0] / expected[expected > 0]).sum()
    assert chi2 < 20.5  # chi-square, <= 5 degrees of freedom, p ~ 0.001
    assert choose_token(logits, SamplingParams(temperature=0.0), rng) == 0
