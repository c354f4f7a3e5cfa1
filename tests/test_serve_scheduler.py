"""Continuous batching: the decode loop's ``Scheduler`` over the ORT engine, and the server's LM worker.

A row admitted into a running batch generates exactly what it generates alone (the dynamo graph and
the fused graph, whose keys the engine re-rotates when their cache columns move); rows join a running
batch (continuous) or only an empty one (static, and backends that cannot regroup their cache);
over HTTP a short request finishes while a long one streams, a client that hangs up (streamed or
not) frees its row, a full queue is a 429 with ``Retry-After``, and a model failure answers its
requests only.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import re
import threading
import time

import httpx
import numpy as np
import pytest

from stillroom.core.ort_session import SessionOptions
from stillroom.plugins.lm.decode_loop import Generation, Row, Scheduler, left_pad, prefill_positions
from stillroom.plugins.lm.sampling import SamplingParams
from tests.test_serve_runtime import lm_artifact, lm_pair  # noqa: F401 - fixtures

PROMPTS = [[5, 17, 33], list(range(40, 80)), [9, 2, 41, 7, 19, 23, 4], [11], list(range(100, 125))]


@pytest.fixture(scope="module")
def engines(lm_pair, lm_artifact, tmp_path_factory):  # noqa: F811
    """The served artifact's dynamo graph, and a fused graph (GroupQueryAttention needs head_dim 16)."""
    from transformers import AutoTokenizer

    from stillroom.plugins.lm.engine import open_engine
    from stillroom.plugins.lm.export.onnx_artifact import export_causal_lm
    from stillroom.testing import build_tiny_llama

    root = tmp_path_factory.mktemp("fused")
    build_tiny_llama(root / "student", AutoTokenizer.from_pretrained(lm_pair[1]), layers=1, hidden=64, seed=2)
    fused = export_causal_lm(root / "student", root / "artifact", fused=True)
    options = SessionOptions.decode(threads=1)
    return {
        "kv-cache": open_engine(lm_artifact, options=options),
        "fused": open_engine(fused, options=options),
    }


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True)


def _drain(scheduler: Scheduler, arrivals: dict[int, list[Row]]) -> dict[Row, int]:
    """Steps until every row is done, adding ``arrivals[step]`` before that step; each row's first step."""
    first: dict[Row, int] = {}
    step = 0
    while scheduler.rows or scheduler.waiting or any(k >= step for k in arrivals):
        scheduler.add(arrivals.get(step, []))
        for row in scheduler.step():
            first.setdefault(row, step)
        step += 1
    return first


class _Counting:
    """``inner``, counting its cache moves."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, {"place_rows": 0, "regroup_cache": 0}

    def __getattr__(self, name):
        if name in self.calls:
            self.calls[name] += 1
        return getattr(self.inner, name)


@pytest.mark.parametrize("variant", ["kv-cache", "fused"])
def test_rows_admitted_mid_flight_generate_what_they_generate_alone(engines, variant):
    lm = _Counting(engines[variant])
    alone = [Generation(lm.inner, [p], [_greedy(24)], 0).run().outputs[0] for p in PROMPTS]
    rows = [Row(p, _greedy(6 + 4 * i)) for i, p in enumerate(PROMPTS)]
    # newcomers grow the batch, wait for a place and take it in place, widen the batch; rows leave
    # (padding trimmed, free places compacted)
    _drain(Scheduler(lm, 0, max_batch=3), {0: rows[:2], 2: rows[2:4], 5: rows[4:]})
    for i, row in enumerate(rows):
        assert row.finish_reason == "length" and row.tokens == alone[i][: len(row.tokens)], i
    assert lm.calls["place_rows"] >= 1 and lm.calls["regroup_cache"] >= 3, lm.calls


def test_rows_that_would_pass_the_last_rope_column_wait(engines):
    """The fused graph has RoPE tables for 256 columns: a short prompt with 200 tokens to come cannot
    be right-aligned next to a 200-token prompt, so it waits for that row to leave."""
    lm = engines["fused"]
    assert lm.max_columns == 256 and engines["kv-cache"].max_columns is None
    wide, far = Row(list(range(1, 201)), _greedy(10)), Row(PROMPTS[0], _greedy(200))
    first = _drain(Scheduler(lm, 0, max_batch=2), {0: [wide, far]})
    assert first[far] == 10 and far.tokens == Generation(lm, [PROMPTS[0]], [_greedy(200)], 0).run().outputs[0]


@pytest.mark.parametrize("variant", ["kv-cache", "fused"])
def test_a_regrouped_cache_gives_the_same_logits_up_to_float_rounding(engines, variant):
    """Moving a row's cache by s columns (padding gained or dropped) changes its next logits only at
    float32 rounding; the fused graph's keys are re-rotated (unrotated, logits move by 1e-3 and more)."""
    lm = engines[variant]
    ids, mask = left_pad([PROMPTS[2]], 0)
    width = ids.shape[1]
    logits, cache = lm.forward(ids, mask, prefill_positions(mask), lm.new_cache(1))
    token, position = logits.argmax(-1)[:, None], np.array([[width]])
    one_more, two_more = np.ones((1, width + 1), np.int64), np.ones((1, width + 2), np.int64)
    reference, stepped = lm.forward(token, one_more, position, cache)
    second, _ = lm.forward(token, two_more, position + 1, stepped)
    for shift in (1, 9, 40):
        # padding gained (a shared cache where the graph has one), then dropped again (an unshared one)
        moved = lm.regroup_cache([(cache, [0], width)], width + shift, width + shift + 1)
        padded = np.concatenate([np.zeros((1, shift), np.int64), one_more], axis=1)
        got, moved = lm.forward(token, padded, position, moved)
        np.testing.assert_allclose(got, reference, atol=1e-5, rtol=0)
        back = lm.regroup_cache([(moved, [0], width + shift + 1)], width + 1)
        got, _ = lm.forward(token, two_more, position + 1, back)
        np.testing.assert_allclose(got, second, atol=1e-5, rtol=0)


def test_continuous_admits_into_a_running_batch_static_waits_for_it_to_empty(engines):
    lm = engines["kv-cache"]
    firsts = {}
    for continuous in (True, False):
        long, short, late = (Row(p, _greedy(n)) for p, n in zip(PROMPTS, (8, 2, 2), strict=False))
        first = _drain(Scheduler(lm, 0, max_batch=2, continuous=continuous), {0: [long, short, late]})
        firsts[continuous] = first[late]
        assert [len(r.tokens) for r in (long, short, late)] == [8, 2, 2]
    assert firsts == {True: 2, False: 8}  # the short row left after step 1; the long one after step 7


class _NoRegroup:
    """A backend that cannot regroup its cache (as the torch and TensorRT backends)."""

    def __init__(self, inner) -> None:
        self.new_cache, self.forward, self.full_logits = inner.new_cache, inner.forward, inner.full_logits


def test_a_backend_that_cannot_regroup_batches_statically(engines):
    lm = engines["kv-cache"]
    params = [_greedy(n) for n in (3, 9, 5)]
    regrouped = Generation(lm, PROMPTS[:3], params, 0).run()
    static = Generation(_NoRegroup(lm), PROMPTS[:3], params, 0).run()
    assert static.outputs == regrouped.outputs and static.steps == regrouped.steps == 9
    scheduler = Scheduler(_NoRegroup(lm), 0, max_batch=4)
    scheduler.add([Row(PROMPTS[0], _greedy(1)), Row(PROMPTS[1], _greedy(3))])
    scheduler.step()
    assert not scheduler.continuous and scheduler.room == 0 and len(scheduler.rows) == 2  # finished row stays
    scheduler.step()
    scheduler.step()
    assert scheduler.rows == [] and scheduler.room == 4


def test_newcomers_prefill_within_the_token_budget_and_padding_share(engines):
    def queued(lengths):
        return [Row(list(range(1, n + 1)), _greedy(30)) for n in lengths]

    scheduler = Scheduler(engines["kv-cache"], 0, max_batch=8, prefill_tokens=25, max_padding=0.25)
    scheduler.add(queued([3, 10]))  # nothing runs: one prefill takes all (no running row to hold up)
    scheduler.step()
    assert len(scheduler.admitted) == 2
    scheduler.add(queued([10, 10, 10, 3, 40]))
    sizes = []
    while scheduler.waiting:
        scheduler.step()
        sizes.append([len(row.prompt) for row in scheduler.admitted])
    # 3 x 10 padded tokens > 25; a 3-token prompt next to a 10-token one is 7 of 20 padding (> 1/4);
    # a 40-token prompt alone exceeds the budget but goes: a prefill's first row always goes
    assert sizes == [[10, 10], [10], [3], [40]]


# -- over HTTP ------------------------------------------------------------------------------------------
class _Paced:
    """``inner`` slowed to ``delay`` s a call, never choosing ``eos`` (rows run to max_tokens), waiting
    for ``gate`` before each call and raising ``fail`` once when it is set."""

    def __init__(self, inner, eos, delay: float = 0.0) -> None:
        self.inner, self.eos, self.delay = inner, sorted(eos), delay
        self.gate = threading.Event()
        self.gate.set()
        self.fail: Exception | None = None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward(self, *args):
        self.gate.wait()
        if self.fail is not None:
            err, self.fail = self.fail, None
            raise err
        time.sleep(self.delay)
        logits, cache = self.inner.forward(*args)
        logits = logits.copy()
        logits[:, self.eos] = -np.inf
        return logits, cache


@pytest.fixture
def served(lm_artifact):  # noqa: F811
    """Starts a server of the tiny LM behind a ``_Paced`` backend: ``served(delay, **settings)``."""
    from stillroom.serve.runtimes import onnxruntime_runtime as load_onnxruntime
    from stillroom.serve.server.app import ServerSettings, create_app
    from stillroom.serve.server.run import ServerThread

    threads = []

    def start(delay: float = 0.0, **settings):
        model = load_onnxruntime(lm_artifact, provider="cpu", name="tiny")
        paced = _Paced(model.backend, model.eos_ids, delay)
        thread = ServerThread(
            create_app(dataclasses.replace(model, backend=paced), ServerSettings(**settings))
        )
        threads.append(thread.__enter__())
        # answered after the app's own warm-up request (FIFO): the model thread is idle again
        r = httpx.post(f"{thread.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, timeout=30)
        assert r.status_code == 200, r.text
        return thread.url, paced

    yield start
    for thread in threads:
        thread.__exit__(None, None, None)


def _gauge(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return float(re.search(rf"^stillroom_{name}\{{.*\}} (\S+)$", text, re.M).group(1))


def _until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _first_event(stream):
    """The stream's lines after its first event; keep them (a dropped iterator closes the connection)."""
    lines = stream.iter_lines()
    assert next(line for line in lines if line.startswith("data: "))
    return lines


def test_a_short_request_finishes_while_a_long_one_streams(served):
    url, _ = served(delay=0.01)
    long = {"prompt": "To be, or not", "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=long, timeout=30) as stream:
        _lines = _first_event(stream)  # the long row is running
        started = time.perf_counter()
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "No", "max_tokens": 4}, timeout=30)
        took = time.perf_counter() - started
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        assert _gauge(url, "running_sequences") == 1  # the long one still runs: the short one joined it
    assert took < 1.0, took  # 5 steps of 10 ms next to the long row, not its 2 s


def test_a_client_disconnect_mid_stream_frees_its_row(served):
    url, _ = served(delay=0.005)
    payload = {"prompt": "To be", "max_tokens": 240, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=payload, timeout=30) as stream:
        _lines = _first_event(stream)
        assert _gauge(url, "running_sequences") == 1
    # the client hung up after its first chunk: its row leaves the batch long before 240 tokens
    assert _until(lambda: _gauge(url, "running_sequences") == 0)
    assert _gauge(url, "generated_tokens_total") < 120


def test_a_client_that_hangs_up_on_a_whole_body_request_frees_its_row(served):
    url, _ = served(delay=0.005)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up before the 240 tokens are ready
        httpx.post(f"{url}/v1/completions", json={"prompt": "To be", "max_tokens": 240}, timeout=0.3)
    assert _until(lambda: _gauge(url, "running_sequences") == 0, timeout=1.0)  # polled every 0.5 s
    assert _gauge(url, "generated_tokens_total") < 200


def test_a_full_queue_is_429_with_retry_after(served):
    url, paced = served(max_batch=1, max_queue=1)
    paced.gate.clear()  # the model thread stops at its next call: one request runs, one queues
    try:
        body = {"prompt": "To be", "max_tokens": 2}
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            calls = [
                pool.submit(httpx.post, f"{url}/v1/completions", json=body, timeout=30) for _ in range(3)
            ]
            refused = next(call.result() for call in concurrent.futures.as_completed(calls))
            assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
            error = refused.json()["error"]
            assert error["code"] == "queue_full" and error["type"] == "server_busy" and error["message"]
            assert _gauge(url, "queue_rejections_total") >= 1
            paced.gate.set()
            statuses = sorted(call.result().status_code for call in calls)
    finally:
        paced.gate.set()
    assert statuses[0] == 200 and set(statuses) <= {200, 429}


def test_a_model_failure_answers_its_requests_and_the_server_keeps_serving(served):
    url, paced = served()
    paced.fail = RuntimeError("device lost")
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "To be", "max_tokens": 3}, timeout=30)
    assert r.status_code == 500 and "device lost" not in r.text
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "To be", "max_tokens": 3}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert _gauge(url, "running_sequences") == 0
