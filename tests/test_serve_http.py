"""`stillroom serve` for LM artifacts: a real uvicorn server on an ephemeral loopback port, over HTTP."""

from __future__ import annotations

import concurrent.futures
import json
import re
import threading

import httpx
import pytest

from tests.test_serve_runtime import lm_artifact, lm_pair  # noqa: F401 - fixtures

KEY = "s3cret-key"


def _serve(artifact, **settings):
    from stillroom.serve.runtimes import onnxruntime_runtime as load_onnxruntime
    from stillroom.serve.server.app import ServerSettings, create_app
    from stillroom.serve.server.run import ServerThread

    model = load_onnxruntime(artifact, provider="cpu", name="tiny-student")
    return model, ServerThread(create_app(model, ServerSettings(**settings)))


@pytest.fixture(scope="module")
def server(lm_artifact):  # noqa: F811
    model, thread = _serve(
        lm_artifact, max_batch=8, max_wait_ms=150, max_body_bytes=4096, max_tokens_limit=64
    )
    with thread:
        yield model, thread.url


def _greedy_text(model, prompt: str, n: int) -> str:
    from stillroom.plugins.lm.sampling import SamplingParams

    gen = model.generate([model.encode(prompt)], [SamplingParams(max_tokens=n, stop_token_ids=model.eos_ids)])
    return model.decode(gen.run().outputs[0])


def _sse(lines) -> list:
    events = []
    for line in lines:
        if line.startswith("data: "):
            events.append(line[len("data: ") :])
    assert events and events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


def test_completion_is_the_runtimes_greedy_text(server):
    model, url = server
    r = httpx.post(
        f"{url}/v1/completions",
        json={"model": "tiny-student", "prompt": "To be, or not", "max_tokens": 10, "temperature": 0},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny-student"
    choice = body["choices"][0]
    assert choice["text"] == _greedy_text(model, "To be, or not", 10)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(model.encode("To be, or not"))
    assert (
        usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > usage["prompt_tokens"]
    )


def test_streaming_completion_parsed_to_done(server):
    model, url = server
    payload = {"prompt": "Whether 'tis", "max_tokens": 12, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=payload, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        chunks = _sse(r.iter_lines())
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == _greedy_text(model, "Whether 'tis", 12)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert len(chunks) > 2  # streamed in pieces, not one blob


def test_stop_string_cuts_the_text(server):
    model, url = server
    full = _greedy_text(model, "And by opposing", 16)
    stop = full[3:5] if len(full) > 6 else None
    if not stop or not stop.strip():
        pytest.skip("greedy text too short for a stop string")
    r = httpx.post(
        f"{url}/v1/completions",
        json={"prompt": "And by opposing", "max_tokens": 16, "temperature": 0, "stop": [stop]},
        timeout=30,
    )
    choice = r.json()["choices"][0]
    assert choice["text"] == full[: full.find(stop)] and choice["finish_reason"] == "stop"


def test_chat_completion_and_stream(server):
    model, url = server
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "To be?"}]
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json={"messages": messages, "max_tokens": 8, "temperature": 0},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    prompt = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    message = body["choices"][0]["message"]
    assert body["object"] == "chat.completion" and message["role"] == "assistant"
    assert message["content"] == _greedy_text(model, prompt, 8)
    with httpx.stream(
        "POST",
        f"{url}/v1/chat/completions",
        timeout=30,
        json={"messages": messages, "max_tokens": 8, "temperature": 0, "stream": True},
    ) as r:
        chunks = _sse(r.iter_lines())
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == message["content"]
    assert chunks[-1]["object"] == "chat.completion.chunk" and chunks[-1]["choices"][0]["finish_reason"]


def test_models_and_health(server):
    _, url = server
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    data = httpx.get(f"{url}/v1/models").json()
    assert data["object"] == "list" and data["data"][0]["id"] == "tiny-student"


@pytest.mark.parametrize(
    "body,param",
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (json.dumps({"prompt": "hi", "max_tokens": "5"}).encode(), "max_tokens"),
        (json.dumps({"prompt": "hi", "max_tokens": 0}).encode(), "max_tokens"),
        (json.dumps({"prompt": "hi", "max_tokens": 10_000}).encode(), "max_tokens"),
        (json.dumps({"prompt": "hi", "temperature": 5}).encode(), "temperature"),
        (json.dumps({"prompt": "hi", "n": 0}).encode(), "n"),
        (json.dumps({"prompt": "hi", "n": 99}).encode(), "n"),
        (json.dumps({"prompt": 42}).encode(), "prompt"),
        (json.dumps({"max_tokens": 4}).encode(), "prompt"),
        (json.dumps({"prompt": "hi", "top_p": 0}).encode(), "top_p"),
        (json.dumps({"prompt": "hi", "stream": "yes"}).encode(), "stream"),
    ],
)
def test_bad_requests_are_openai_style_4xx(server, body, param):
    _, url = server
    r = httpx.post(f"{url}/v1/completions", content=body, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    if param:
        assert error["param"] is not None and error["param"].startswith(param)


def test_unknown_model_oversized_body_and_unknown_route(server):
    _, url = server
    r = httpx.post(f"{url}/v1/completions", json={"model": "gpt-x", "prompt": "hi"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "x" * 10_000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(f"{url}/v1/images/generations", json={"n": 1})
    assert r.status_code == 404 and "error" in r.json()
    assert httpx.get(f"{url}/health").status_code == 200  # still alive


def test_concurrent_requests_share_the_batch_and_stay_correct(server):
    """Each row is prefilled once (the histogram counts prefilled rows); how many prefill calls that
    took depends on arrival order under continuous batching, so only the rows are counted."""
    model, url = server
    prompts = ["To be", "The slings and arrows", "No more", "Devoutly", "That flesh", "Or to take arms"]

    start = threading.Barrier(len(prompts))

    def call(prompt):
        with httpx.Client(timeout=60) as client:
            start.wait()  # all requests leave together, also on a loaded machine
            body = {"prompt": prompt, "max_tokens": 6, "temperature": 0}
            r = client.post(f"{url}/v1/completions", json=body)
        return r.json()["choices"][0]["text"]

    before = _batch_histogram(httpx.get(f"{url}/metrics").text)
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        texts = list(pool.map(call, prompts))
    after = _batch_histogram(httpx.get(f"{url}/metrics").text)
    assert texts == [_greedy_text(model, p, 6) for p in prompts]  # left-padded batch == alone
    batches, rows = after["count"] - before["count"], after["sum"] - before["sum"]
    assert rows == len(prompts) and 1 <= batches <= len(prompts), (batches, rows)


def _batch_histogram(text: str) -> dict[str, float]:
    count = float(re.search(r"^stillroom_batch_size_count\{.*\} (\S+)$", text, re.M).group(1))
    total = float(re.search(r"^stillroom_batch_size_sum\{.*\} (\S+)$", text, re.M).group(1))
    return {"count": count, "sum": total}


def test_metrics_are_prometheus_text(server):
    from prometheus_client.parser import text_string_to_metric_families

    _, url = server
    httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    httpx.post(f"{url}/v1/completions", content=b"{")
    r = httpx.get(f"{url}/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    samples = [s for family in text_string_to_metric_families(r.text) for s in family.samples]

    def value(name: str, **labels: str) -> float:
        return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())

    ok = {"model": "tiny-student", "endpoint": "/v1/completions", "status": "200"}
    assert value("stillroom_requests_total", **ok) >= 1
    assert value("stillroom_requests_total", endpoint="/v1/completions", status="400") >= 1
    assert value("stillroom_request_latency_seconds_bucket", le="+Inf") >= 1
    assert value("stillroom_queue_depth") == 0
    assert value("stillroom_generated_tokens_total") >= 1


def test_stillroom_serve_cli_enforces_the_api_key(lm_artifact):  # noqa: F811
    import socket
    import subprocess
    import time

    from tests.conftest import STILLROOM, cli_env

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [STILLROOM, "serve", str(lm_artifact), "--port", str(port), "--name", "cli-model"],
        env=cli_env(STILLROOM_API_KEY=KEY),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {KEY}"}
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "server did not start"
            try:
                if httpx.get(f"{url}/health", headers=auth, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert httpx.get(f"{url}/v1/models").status_code == 401
        r = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/v1/models", headers=auth).json()["data"][0]["id"] == "cli-model"
        r = httpx.post(
            f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers=auth, timeout=30
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_request_timeout_is_answered_and_the_server_survives(lm_artifact):  # noqa: F811
    _, thread = _serve(lm_artifact, request_timeout_s=0.001, max_wait_ms=50)
    with thread:
        r = httpx.post(f"{thread.url}/v1/completions", json={"prompt": "To be", "max_tokens": 32}, timeout=30)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        assert httpx.get(f"{thread.url}/health").status_code == 200


def test_a_stream_closed_early_frees_its_row(server):
    from stillroom.plugins.lm.sampling import SamplingParams

    model, url = server
    alone = model.generate(
        [model.encode("To be")], [SamplingParams(max_tokens=64, stop_token_ids=model.eos_ids)]
    )
    if len(alone.run().outputs[0]) < 64:
        pytest.skip("the tiny model stops early on its own; the test needs a 64-token row")
    before = httpx.get(f"{url}/metrics").text
    tokens_before = float(re.search(r"^stillroom_generated_tokens_total\{.*\} (\S+)$", before, re.M).group(1))
    payload = {"prompt": "To be", "max_tokens": 64, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=payload, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # the client goes away after the first chunk
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "No more", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200
    after = httpx.get(f"{url}/metrics").text
    tokens_after = float(re.search(r"^stillroom_generated_tokens_total\{.*\} (\S+)$", after, re.M).group(1))
    assert tokens_after - tokens_before < 64 + 3  # the abandoned row stopped before its 64 tokens
