"""The generator path's batching: the arrival window's decisions and the finishing stage's overlap."""

from __future__ import annotations

import asyncio
import threading
import time

from stillroom.serve.server.batcher import ArrivalWindow, Job, MicroBatcher
from stillroom.serve.server.metrics import Metrics


def _window(fixed_ms: float, gap_ms: float, max_wait_ms: float = 50.0) -> ArrivalWindow:
    """A window that has fitted ``fixed_ms`` a model call and sees a request every ``gap_ms``."""
    window = ArrivalWindow(max_wait=max_wait_ms / 1000)
    for items in (1, 2, 4, 8) * 4:
        window.ran(items, (fixed_ms + 2.0 * items) / 1000)
    for k in range(200, 0, -1):  # the last 200 arrivals, up to now
        window.arrived(time.perf_counter() - k * gap_ms / 1000)
    return window


def test_the_window_waits_only_when_arrivals_during_the_fixed_cost_exceed_the_batch():
    assert abs(_window(20.0, 1.0).fixed - 0.020) < 1e-6  # the least-squares fit of fixed + per item
    busy_gpu_like = _window(20.0, 1.0)  # 20 requests arrive during one fixed cost
    assert busy_gpu_like.patience(items=4, last_jobs=4) > 0
    assert busy_gpu_like.patience(items=25, last_jobs=25) == 0
    assert _window(2.0, 1.0).patience(items=4, last_jobs=4) == 0  # small fixed cost: run now
    lone_client = _window(20.0, 22.0)  # one request per model call
    assert lone_client.patience(items=1, last_jobs=1) == 0
    assert _window(40.0, 45.0, max_wait_ms=10.0).patience(items=1, last_jobs=1) == 0  # call > max_wait
    assert ArrivalWindow(max_wait=0.05).patience(items=1, last_jobs=2) == 0  # nothing fitted yet


class _Sized(Job):
    def __init__(self, size: int = 1) -> None:
        super().__init__()
        self.size = size


def test_an_idle_model_with_a_costly_call_waits_for_company_a_cheap_one_does_not():
    """Requests every 2 ms reach an idle model: how many does the next batch gather?"""

    def gathered(fixed_ms: float) -> int:
        async def scenario():
            window = _window(fixed_ms, 2.0)
            batcher = MicroBatcher(lambda jobs: None, 64, 200, Metrics("m"), window=window)
            batcher.pending = asyncio.Queue()  # not started: _gather is called directly

            async def arrivals():
                for _ in range(40):
                    batcher.submit(_Sized())
                    await asyncio.sleep(0.002)

            feeder = asyncio.create_task(arrivals())
            batch = await batcher._gather()
            feeder.cancel()
            return len(batch)

        return asyncio.run(scenario())

    assert gathered(1.0) == 1  # half a request arrives per fixed cost: run at once
    assert gathered(40.0) >= 5  # 20 arrive per fixed cost: worth waiting for


def test_finishing_runs_on_its_own_thread_while_the_model_starts_the_next_batch():
    events: list[tuple[str, int, str]] = []

    def run_batch(jobs):
        batch = jobs[0].index
        events.append(("model", batch, threading.current_thread().name))

        def finish():
            events.append(("finish", batch, threading.current_thread().name))
            time.sleep(0.1)
            events.append(("finished", batch, threading.current_thread().name))
            for job in jobs:
                job.put("done")

        return finish

    async def scenario():
        batcher = MicroBatcher(run_batch, 1, 0, Metrics("m"))
        batcher.start()
        jobs = [_Sized() for _ in range(2)]
        for index, job in enumerate(jobs):
            job.index = index
            batcher.submit(job)
        await asyncio.gather(*(job.queue.get() for job in jobs))
        await batcher.stop()

    asyncio.run(scenario())
    order = [(what, batch) for what, batch, _ in events]
    assert order.index(("model", 1)) < order.index(("finished", 0))  # batch 1 ran while 0 was finishing
    assert order.index(("finished", 0)) < order.index(("finish", 1))  # finishing keeps batch order
    threads = {what: name for what, _, name in events}
    assert threads["model"].startswith("stillroom-model")
    assert threads["finish"].startswith("stillroom-finish")


def test_a_failing_finish_answers_its_jobs_with_the_error():
    def run_batch(jobs):
        def finish():
            raise RuntimeError("encoder broke")

        return finish

    async def scenario():
        batcher = MicroBatcher(run_batch, 4, 0, Metrics("m"))
        batcher.start()
        job = _Sized()
        batcher.submit(job)
        result = await asyncio.wait_for(job.queue.get(), 10)
        await batcher.stop()
        return result

    assert isinstance(asyncio.run(scenario()), RuntimeError)
