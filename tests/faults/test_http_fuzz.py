"""HTTP fuzzing of a live `stillroom serve` (tiny LM and tiny generator artifacts, separate processes).

More than 1000 generated requests in all (see ``fuzz_requests``), plus SSE clients that disconnect
mid-stream and raw-socket clients that send half a request and vanish. Every response must be < 500
with no stack trace in its body; afterwards the server answers /health, its own /metrics counted no
5xx, its RSS did not keep growing between two equal rounds, and it wrote nothing in its directory.
"""

from __future__ import annotations

import json
import socket
import time

import httpx
import psutil
import pytest

from tests.faults.conftest import FORBIDDEN_IN_BODIES, serve, status_counts
from tests.faults.fuzz_requests import Case, Fuzzer

MAX_BODY = 16384
ROUND = {"causal-lm": 400, "generator": 160}  # two rounds each: 1120 generated requests in all
RSS_GROWTH_LIMIT = 40 * 2**20


def send(client: httpx.Client, url: str, case: Case) -> tuple[int | None, bytes]:
    content = iter(case.chunks) if case.chunks is not None else case.body
    try:
        r = client.request(case.method, url + case.path, headers=case.headers, content=content)
        return r.status_code, r.content
    except (httpx.RemoteProtocolError, httpx.WriteError, httpx.ReadError) as err:
        # the server may answer 413 and close while an oversized body is still being sent
        if "oversized" in case.what:
            return None, str(err).encode()
        raise


def check_response(case: Case, index: int, status: int | None, body: bytes) -> None:
    where = f"case {index} ({case.what}): {case.method} {case.path[:60]} {str(case.body)[:200]}"
    if status is None:
        return
    assert status < 500, f"{where} -> {status} {body[:300]!r}"
    text = body.decode("utf-8", "replace")
    for marker in FORBIDDEN_IN_BODIES:
        assert marker not in text, f"{where} leaked {marker!r}: {text[:300]}"
    if status >= 400 and case.method != "HEAD" and body:
        err = json.loads(body)["error"]
        assert err["message"] and "\n" not in err["message"], where


def broken_sse_clients(url: str, route_body: dict, count: int) -> None:
    """Streaming clients that read one event and hang up, and raw clients that send half a request."""
    for i in range(count):
        with httpx.stream("POST", f"{url}/v1/completions", json={**route_body, "seed": i}, timeout=30) as r:
            assert r.status_code == 200
            for _ in r.iter_raw(16):
                break  # hang up mid-stream
    for head in (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 900\r\n\r\n"
        b'{"prompt": "To',
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le",
        b"GET /health HTTP/1.1\r\nHost: x\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello on the plain-HTTP port
    ):
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=5) as s:
            s.sendall(head)
            time.sleep(0.02)


def fuzz_round(url: str, fuzzer: Fuzzer, n: int) -> dict[int | None, int]:
    seen: dict[int | None, int] = {}
    with httpx.Client(timeout=60) as client:
        for index, case in enumerate(fuzzer.cases(n)):
            status, body = send(client, url, case)
            check_response(case, index, status, body)
            seen[status] = seen.get(status, 0) + 1
    return seen


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


@pytest.mark.parametrize("kind", ["causal-lm", "generator"])
def test_fuzzed_requests_never_5xx_and_server_stays_healthy(kind, lm_art, gen_art, tmp_path, record_property):
    art = lm_art if kind == "causal-lm" else gen_art
    workdir = tmp_path / "cwd"
    with serve(
        art, workdir, "--max-body-bytes", str(MAX_BODY), "--max-tokens-limit", "8", "--max-wait-ms", "2"
    ) as server:
        fuzzer = Fuzzer(kind, seed=8, max_body=MAX_BODY)
        first = fuzz_round(server.url, fuzzer, ROUND[kind])
        if kind == "causal-lm":
            broken_sse_clients(server.url, {"prompt": "To be", "max_tokens": 8, "stream": True}, 10)
        rss_after_first = rss(server.pid)
        second = fuzz_round(server.url, fuzzer, ROUND[kind])
        if kind == "causal-lm":
            broken_sse_clients(server.url, {"prompt": "To be", "max_tokens": 8, "stream": True}, 10)
        rss_after_second = rss(server.pid)
        health = httpx.get(f"{server.url}/health", timeout=10)
        assert health.status_code == 200 and health.json()["status"] == "ok"
        counted = status_counts(httpx.get(f"{server.url}/metrics", timeout=10).text)
    assert not [s for s in counted if s >= 500], counted
    statuses = {k: first.get(k, 0) + second.get(k, 0) for k in {*first, *second}}
    record_property("requests", sum(statuses.values()))
    record_property("statuses", json.dumps({str(k): v for k, v in sorted(statuses.items(), key=str)}))
    record_property("rss_mb", [round(rss_after_first / 2**20, 1), round(rss_after_second / 2**20, 1)])
    print(
        f"\n{kind}: {sum(statuses.values())} fuzzed requests, statuses {statuses}, server RSS "
        f"{rss_after_first / 2**20:.1f} -> {rss_after_second / 2**20:.1f} MiB"
    )
    assert statuses.get(200, 0) > 20, statuses  # the fuzzer also exercised real generation
    assert sum(v for k, v in statuses.items() if k is not None and k >= 400) > ROUND[kind] // 2
    assert rss_after_second - rss_after_first < RSS_GROWTH_LIMIT
    assert list(workdir.iterdir()) == []  # no request made the server write a file
