"""`stillroom serve` security defaults, checked on a live process: loopback bind, API key (on every
route but the probes and /metrics), body limit, request timeout, and error bodies that never carry a
stack trace."""

from __future__ import annotations

import httpx
import psutil

from stillroom.serve.commands import serve as serve_command
from tests.faults.conftest import FORBIDDEN_IN_BODIES, serve

KEY = "k-" + "7" * 30


def no_trace(r: httpx.Response) -> dict:
    for marker in FORBIDDEN_IN_BODIES:
        assert marker not in r.text, r.text
    err = r.json()["error"]
    assert err["message"] and "\n" not in err["message"]
    return err


def test_defaults_are_loopback_and_bounded():
    defaults = {p.name: p.default for p in serve_command.params}
    assert defaults["host"] == "127.0.0.1"
    assert defaults["max_body_bytes"] == 1 << 20 and defaults["timeout_s"] == 120.0
    # optional (click's UNSET sentinel: no key unless --api-key / STILLROOM_API_KEY), enforced below
    assert defaults["api_key"] in (None, "") or "UNSET" in str(defaults["api_key"])


def test_live_server_binds_loopback_enforces_key_body_limit_and_timeout(lm_art, tmp_path):
    with serve(
        lm_art,
        tmp_path / "cwd",
        "--api-key",
        KEY,
        "--max-body-bytes",
        "4096",
        "--timeout",
        "0.1",
        "--max-tokens-limit",
        "240",
        "--max-batch",
        "64",
    ) as server:
        listening = [
            c.laddr
            for c in psutil.Process(server.pid).net_connections("inet")
            if c.status == psutil.CONN_LISTEN
        ]
        assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening

        url, auth = server.url, {"Authorization": f"Bearer {KEY}"}
        body = {"prompt": "To be", "max_tokens": 2}
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": KEY},
            {"Authorization": f"Bearer {KEY[:-1]}"},
            {"Authorization": f"bearer {KEY}"},
        ):
            for method, path in (("POST", "/v1/completions"), ("GET", "/v1/models"), ("GET", "/nowhere")):
                r = httpx.request(
                    method, url + path, json=body if method == "POST" else None, headers=headers, timeout=10
                )
                assert r.status_code == 401 and no_trace(r)["code"] == "invalid_api_key", (headers, path)
                assert r.headers["www-authenticate"] == "Bearer"
            for path in ("/health", "/ready", "/metrics"):  # probes and scrapers have no key (--metrics-auth)
                assert httpx.get(url + path, headers=headers, timeout=10).status_code == 200, (headers, path)

        ok = httpx.post(f"{url}/v1/completions", json=body, headers=auth, timeout=30)
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] is not None

        big = {"prompt": "x" * 5000}
        r = httpx.post(f"{url}/v1/completions", json=big, headers=auth, timeout=10)
        assert r.status_code == 413 and no_trace(r)["code"] == "request_too_large"
        raw = httpx.Request(
            "POST",
            f"{url}/v1/completions",
            headers=auth,
            content=iter([b'{"prompt": "', b"x" * 3000, b"x" * 3000, b'"}']),
        )
        with httpx.Client(timeout=10) as client:
            r = client.send(raw)  # chunked: no Content-Length to trust
        assert r.status_code == 413 and no_trace(r)["code"] == "request_too_large"

        slow = {"prompt": ["To be, or not to be"] * 16, "n": 4, "max_tokens": 240, "temperature": 1.0}
        r = httpx.post(f"{url}/v1/completions", json=slow, headers=auth, timeout=30)
        assert r.status_code == 504 and no_trace(r)["code"] == "timeout", r.text

        assert httpx.get(f"{url}/health", headers=auth, timeout=10).status_code == 200
        again = httpx.post(f"{url}/v1/completions", json=body, headers=auth, timeout=30)
        assert again.status_code == 200  # the timed-out job was dropped; the server serves on
