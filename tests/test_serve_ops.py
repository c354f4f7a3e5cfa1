"""`stillroom serve` operations: which routes need the key, /ready, request ids, the access log (text
and JSON), the OpenAPI document, the Prometheus metrics, and a SIGTERM drain of a real process."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.test_serve_images import generator_artifact, generator_student  # noqa: F401 - fixtures
from tests.test_serve_runtime import lm_artifact, lm_pair  # noqa: F401 - fixtures

KEY = "ops-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
OPEN = ("/health", "/ready", "/metrics", "/docs", "/openapi.json")


def _server(artifact, **settings):
    from stillroom.serve.runtimes import onnxruntime_runtime as load_onnxruntime
    from stillroom.serve.server.app import ServerSettings, create_app
    from stillroom.serve.server.run import ServerThread

    model = load_onnxruntime(artifact, provider="cpu", name="ops-model")
    return ServerThread(create_app(model, ServerSettings(**settings)))


@pytest.fixture(scope="module")
def server(lm_artifact):  # noqa: F811
    with _server(lm_artifact, api_key=KEY, max_wait_ms=1) as thread:
        yield thread.url


def _samples(text: str) -> list:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def _value(samples: list, name: str, **labels: str) -> float:
    return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())


def test_probes_metrics_and_docs_are_open_while_v1_needs_the_key(server, lm_artifact):  # noqa: F811
    for path in OPEN:
        assert httpx.get(server + path).status_code == 200, path
    assert httpx.get(server + "/ready").json() == {"status": "ready", "model": "ops-model"}
    for path in ("/v1/models", "/nowhere"):
        r = httpx.get(server + path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
    assert httpx.get(server + "/v1/models", headers=AUTH).status_code == 200

    with _server(lm_artifact, api_key=KEY, metrics_auth=True) as locked:
        for path in OPEN:
            assert httpx.get(locked.url + path).status_code == 401, path
            assert httpx.get(locked.url + path, headers=AUTH).status_code == 200, path


def test_ready_is_503_until_the_warm_up_answered(lm_artifact):  # noqa: F811
    import asyncio

    from stillroom.serve.runtimes import onnxruntime_runtime as load_onnxruntime
    from stillroom.serve.server.app import create_app

    model = load_onnxruntime(lm_artifact, provider="cpu", name="ops-model")

    async def ready_before_startup():  # ASGITransport runs no lifespan: the warm-up never starts
        transport = httpx.ASGITransport(app=create_app(model))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/ready")

    r = asyncio.run(ready_before_startup())
    assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
    assert "warming up" in r.json()["error"]["message"]
    with _server(lm_artifact, max_queue=0) as thread:  # every request (the warm-up too) finds the queue full
        r = httpx.get(thread.url + "/ready")
        assert httpx.get(thread.url + "/health").status_code == 200
    error = r.json()["error"]
    assert r.status_code == 503 and error["code"] == "not_ready" and "HTTP 429" in error["message"]
    assert "\n" not in error["message"]


def test_request_ids_are_echoed_or_made(server):
    r = httpx.get(server + "/health", headers={"X-Request-ID": "abc-123.X"})
    assert r.headers["x-request-id"] == "abc-123.X"
    made = httpx.get(server + "/health").headers["x-request-id"]
    assert len(made) == 32 and int(made, 16) >= 0
    for bad in ("has space", "x" * 129, "\u00e9t\u00e9"):
        r = httpx.get(server + "/health", headers={"X-Request-ID": bad.encode("utf-8")})
        assert r.headers["x-request-id"] != bad and len(r.headers["x-request-id"]) == 32
    r = httpx.get(server + "/v1/models", headers={"X-Request-ID": "refused-1"})  # refused by the guard
    assert r.status_code == 401 and r.headers["x-request-id"] == "refused-1"


def test_one_access_line_per_request_with_tokens(server, caplog):
    caplog.set_level(logging.INFO, logger="stillroom.access")
    body = {"prompt": "To be", "max_tokens": 4, "temperature": 0, "stream": True}
    headers = {**AUTH, "X-Request-ID": "stream-1"}
    with httpx.stream("POST", server + "/v1/completions", json=body, headers=headers, timeout=30) as r:
        assert r.status_code == 200 and list(r.iter_lines())[-2] == "data: [DONE]"
    httpx.get(server + "/v1/models", headers={"X-Request-ID": "no-key-1"})
    deadline = time.monotonic() + 5  # each line is written once the last byte is sent

    def access_lines():
        return {r.request_id: r for r in caplog.records if r.name == "stillroom.access"}

    while not {"stream-1", "no-key-1"} <= access_lines().keys() and time.monotonic() < deadline:
        time.sleep(0.01)
    lines = access_lines()
    stream = lines["stream-1"]
    assert (stream.method, stream.path, stream.status) == ("POST", "/v1/completions", 200)
    assert stream.prompt_tokens > 0 and 0 < stream.completion_tokens <= 4 and stream.latency_ms > 0
    assert "POST /v1/completions 200" in stream.getMessage() and "stream-1" in stream.getMessage()
    refused = lines["no-key-1"]
    assert (refused.status, refused.prompt_tokens, refused.completion_tokens) == (401, 0, 0)


def test_json_formatter_writes_one_object_with_the_extra_fields():
    from stillroom.serve.server.access import JsonFormatter

    record = logging.makeLogRecord(
        {"name": "stillroom.access", "levelno": 20, "levelname": "INFO", "msg": "GET %s", "args": ("/x",)}
    )
    record.status, record.request_id = 200, "r-1"
    line = JsonFormatter().format(record)
    entry = json.loads(line)
    assert "\n" not in line and entry["message"] == "GET /x" and entry["logger"] == "stillroom.access"
    assert entry["status"] == 200 and entry["request_id"] == "r-1" and entry["level"] == "INFO"
    assert entry["time"].endswith("+00:00") and "args" not in entry and "msg" not in entry


def test_openapi_describes_every_route(server, lm_artifact, generator_artifact):  # noqa: F811
    from stillroom.serve.runtimes import onnxruntime_runtime as load_onnxruntime
    from stillroom.serve.server.app import create_app

    doc = httpx.get(server + "/openapi.json").json()
    assert set(doc["paths"]) == {
        "/health",
        "/ready",
        "/metrics",
        "/v1/models",
        "/v1/models/{model_id}",
        "/v1/completions",
        "/v1/chat/completions",
    }
    completions = doc["paths"]["/v1/completions"]["post"]
    schema = completions["requestBody"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/CompletionRequest"}
    assert "prompt" in doc["components"]["schemas"]["CompletionRequest"]["properties"]
    assert "ChatMessage" in doc["components"]["schemas"]  # nested models resolve
    assert completions["security"] == [{"bearer": []}] and "security" not in doc["paths"]["/health"]["get"]
    assert "swagger" in httpx.get(server + "/docs").text.lower()

    images = create_app(load_onnxruntime(generator_artifact, provider="cpu")).api.openapi()
    assert set(images["paths"]) == {
        "/health",
        "/ready",
        "/metrics",
        "/v1/models",
        "/v1/models/{model_id}",
        "/v1/images/generations",
    }
    body = images["paths"]["/v1/images/generations"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ImageRequest"}
    assert "security" not in images["paths"]["/v1/images/generations"]["post"]  # no key: nothing to send


def test_metrics_parse_and_carry_every_named_series(server, lm_artifact):  # noqa: F811
    body = {"prompt": "To be", "max_tokens": 6, "temperature": 0, "stream": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, headers=AUTH, timeout=30) as r:
        assert r.status_code == 200 and list(r.iter_lines())
    samples = _samples(httpx.get(server + "/metrics").text)
    names = {s.name for s in samples}
    for family in (
        "stillroom_requests",
        "stillroom_request_latency_seconds",
        "stillroom_time_to_first_token_seconds",
        "stillroom_time_per_output_token_seconds",
        "stillroom_prompt_tokens",
        "stillroom_generated_tokens",
        "stillroom_generated_images",
        "stillroom_batch_size",
    ):
        assert any(n.startswith(family) for n in names), family
    for gauge in ("stillroom_queue_depth", "stillroom_running_sequences", "stillroom_waiting_sequences"):
        assert gauge in names, gauge
    assert {s.labels["model"] for s in samples if "model" in s.labels} == {"ops-model"}
    assert _value(samples, "stillroom_requests_total", endpoint="/v1/completions", status="200") >= 1
    assert _value(samples, "stillroom_time_to_first_token_seconds_count") >= 1
    assert _value(samples, "stillroom_time_per_output_token_seconds_count") >= 1
    assert _value(samples, "stillroom_prompt_tokens_total") >= 2  # the warm-up's and this request's

    r = httpx.get(server + "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert r.headers["content-type"].startswith("application/openmetrics-text") and r.text.endswith("# EOF\n")

    with _server(lm_artifact, max_queue=0) as full:  # every request finds the queue full
        r = httpx.post(full.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1})
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        samples = _samples(httpx.get(full.url + "/metrics").text)
    assert _value(samples, "stillroom_queue_rejections_total") >= 1
    assert _value(samples, "stillroom_requests_total", endpoint="/v1/completions", status="429") == 1


def test_sigterm_finishes_the_stream_refuses_new_connections_and_exits_0(lm_artifact, tmp_path):  # noqa: F811
    from tests.conftest import STILLROOM, cli_env
    from tests.faults.conftest import free_port

    port = free_port()
    url, log = f"http://127.0.0.1:{port}", tmp_path / "serve.log"
    args = ["--port", str(port), "--provider", "cpu", "--threads", "1", "--max-batch", "64"]
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [STILLROOM, "serve", str(lm_artifact), *args, "--log-format", "json", "--grace", "60"],
            env=cli_env(),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "the server did not get ready"
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        # 64 rows of 200 tokens streamed as SSE: seconds of work, far more than the signal needs
        body = {"prompt": ["To be"] * 16, "n": 4, "max_tokens": 200, "temperature": 1.0, "stream": True}
        headers = {"X-Request-ID": "drained-1"}
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
            os.kill(proc.pid, signal.SIGTERM)
            refused_by = time.monotonic() + 10
            while True:  # the listening socket closes at once
                try:
                    httpx.get(url + "/health", timeout=1)
                except httpx.ConnectError:
                    break
                assert time.monotonic() < refused_by, "new connections were still accepted"
                time.sleep(0.05)
            events = [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        finished = [c for e in events[:-1] for c in json.loads(e[6:])["choices"] if c["finish_reason"]]
        assert len(finished) == 64  # every row of the in-flight request ended normally
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    entries = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    said = [e["message"] for e in entries]
    drain = next(i for i, m in enumerate(said) if m.startswith("SIGTERM: refusing new connections"))
    access = next(i for i, e in enumerate(entries) if e.get("request_id") == "drained-1")
    assert access > drain, said  # the request was still in flight when the drain began
    line = entries[access]
    assert (line["method"], line["path"], line["status"], line["logger"]) == (
        "POST",
        "/v1/completions",
        200,
        "stillroom.access",
    )
    assert line["completion_tokens"] > 0 and line["prompt_tokens"] > 0
