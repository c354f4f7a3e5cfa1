"""A seeded generator of hostile HTTP requests for the OpenAI-shaped routes of `stillroom serve`.

Each case is a method, a path, headers and a body (bytes, or an iterator of chunks so no
Content-Length is sent), built from a valid request by one or more mutations: wrong types, huge and
non-finite numbers, unicode (RTL marks, NUL, emoji, lone surrogates), empty, truncated, deeply
nested and oversized bodies, wrong content types, wrong methods and unknown or traversing paths.
The same seed gives the same cases, so a failure is reproducible from its index.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

HUGE = [2**31, 2**63, 2**64, 10**30, -(2**63) - 1, 1e308, -1e308, 1.7976931348623157e308, 5e-324]
STRINGS = [
    "",
    " ",
    "\x00",
    "\u202eevil",
    "😀" * 50,
    "ﬀ" * 10,
    "a" * 3000,
    "\n\r\t",
    "<script>",
    "../../etc/passwd",
    "/etc/passwd",
    "file:///etc/passwd",
    "%00",
    "{{7*7}}",
    "' OR 1=1 --",
    "\ufeff",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]
RAW_TOKENS = [
    "NaN",
    "Infinity",
    "-Infinity",
    '"\\ud800"',
    '"\\udfff\\ud800"',
    "1e999",
    "-0",
    "[]",
    "{}",
    "null",
    "true",
    '"\\u0000"',
]
CONTENT_TYPES = [
    "application/json",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/json; charset=latin-1",
    "application/xml",
    "",
    "*/*",
    "application/json\x7f",
]
FIELDS_LM = [
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stop",
    "seed",
    "model",
    "messages",
    "logprobs",
    "user",
]
FIELDS_IMAGE = ["prompt", "class_label", "n", "seed", "guidance_scale", "response_format", "size", "model"]


@dataclass
class Case:
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    chunks: list[bytes] | None = None  # sent without Content-Length (chunked transfer)
    what: str = ""


def _random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([*HUGE, 0, -1, 1, 7, 3.5, -0.0])
    if kind == 3:
        return rng.choice(STRINGS)
    if kind == 4:
        ranges = [(32, 127), (0x80, 0xD7FF), (0xE000, 0x10FFFF)]  # ASCII, BMP, astral (no surrogates)
        points = [rng.randrange(*rng.choice(ranges)) for _ in range(rng.randrange(1, 40))]
        return "".join(map(chr, points))
    if kind == 5:
        return rng.randrange(-5, 100)
    if kind == 6:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    if kind == 7:
        return {
            rng.choice(STRINGS[:8] + ["prompt", "n"]): _random_value(rng, depth + 1)
            for _ in range(rng.randrange(0, 4))
        }
    return rng.choice(STRINGS)


def _encode(obj, rng: random.Random) -> bytes:
    text = json.dumps(obj, ensure_ascii=rng.random() < 0.5, allow_nan=True)
    if rng.random() < 0.15:  # splice a raw token JSON-encoders never write (NaN, lone surrogates, 1e999)
        key = rng.choice(list(obj)) if isinstance(obj, dict) and obj else None
        if key is not None:
            obj = dict(obj)
            obj[key] = "@@RAW@@"
            text = json.dumps(obj).replace('"@@RAW@@"', rng.choice(RAW_TOKENS))
    return text.encode("utf-8", "surrogatepass")


class Fuzzer:
    """``cases(n)`` yields ``n`` requests for an LM (``kind="causal-lm"``) or image server."""

    def __init__(self, kind: str, seed: int, max_body: int) -> None:
        self.kind, self.rng, self.max_body = kind, random.Random(seed), max_body
        self.route = "/v1/completions" if kind == "causal-lm" else "/v1/images/generations"
        self.fields = FIELDS_LM if kind == "causal-lm" else FIELDS_IMAGE

    def valid(self) -> dict:
        r = self.rng
        if self.kind == "causal-lm":
            body = {
                "prompt": r.choice(["To be", "", "😀 ünïcödé", "a" * r.randrange(1, 60)]),
                "max_tokens": r.randrange(1, 9),
                "temperature": r.choice([0, 0.7, 1.0, 2]),
            }
            if r.random() < 0.3:
                body["stream"] = True
            if r.random() < 0.2:
                body["n"] = r.randrange(1, 4)
            if r.random() < 0.2:
                body["stop"] = [r.choice(["e", "to", "\n"])]
            return body
        body = {"class_label": r.randrange(0, 10), "n": r.randrange(1, 5)}
        if r.random() < 0.3:
            body["seed"] = r.randrange(0, 2**63)
        return body

    def mutated(self) -> dict:
        body = self.valid()
        for _ in range(self.rng.randrange(1, 4)):
            name = self.rng.choice(self.fields)
            if self.rng.random() < 0.15:
                body.pop(name, None)
            else:
                body[name] = _random_value(self.rng)
        return body

    def one(self) -> Case:
        r = self.rng
        pick = r.random()
        headers = {"content-type": "application/json"}
        if pick < 0.45:
            return Case("POST", self.route, headers, _encode(self.mutated(), r), what="mutated body")
        if pick < 0.55:
            return Case("POST", self.route, headers, _encode(self.valid(), r), what="valid body")
        if pick < 0.62:
            return Case("POST", self.route, headers, _encode(_random_value(r), r), what="random JSON")
        if pick < 0.70:
            return Case("POST", self.route, headers, self._broken_bytes(), what="broken bytes")
        if pick < 0.75:
            depth = r.choice([50, 500, 5000, self.max_body // 2])
            nest = r.choice(["[", '{"a":'])
            return Case("POST", self.route, headers, (nest * depth).encode() + b"1", what=f"nesting {depth}")
        if pick < 0.80:
            size = self.max_body + r.randrange(1, 5000)
            body = json.dumps({"prompt": "x" * size}).encode()
            if r.random() < 0.5:
                chunks = [body[i : i + 4096] for i in range(0, len(body), 4096)]
                return Case("POST", self.route, headers, chunks=chunks, what="oversized chunked body")
            return Case("POST", self.route, headers, body, what="oversized body")
        if pick < 0.87:
            ctype = r.choice(CONTENT_TYPES)
            hdrs = {"content-type": ctype} if ctype else {}
            body = _encode(self.valid(), r) if r.random() < 0.5 else b"prompt=hi&max_tokens=2"
            return Case("POST", self.route, hdrs, body, what=f"content-type {ctype!r}")
        if pick < 0.93:
            method = r.choice(["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
            path = r.choice([self.route, "/v1/models", "/health", "/metrics"])
            return Case(
                method,
                path,
                headers,
                _encode(self.valid(), r) if method != "GET" else None,
                what=f"{method} {path}",
            )
        path = r.choice(
            [
                "/",
                "/v1",
                "/v1/chat/completions",
                "/v1/embeddings",
                "/../../etc/passwd",
                "/%2e%2e/%2e%2e/etc/passwd",
                "/v1/completions/../../manifest.json",
                "/manifest.json",
                "/model.onnx",
                "/static/..%2fmanifest.json",
                "/docs",
                "/openapi.json",
                "/" + "a" * r.randrange(100, 6000),
                "/v1/models/../../../etc/shadow",
                "/v1/completions?prompt=hi",
                "/\u00e9\u00e8",
                "/%00",
                "/v1//completions",
            ]
        )
        method = r.choice(["GET", "POST"])
        return Case(method, path, headers, _encode(self.valid(), r), what=f"path {path[:40]}")

    def _broken_bytes(self) -> bytes:
        r = self.rng
        good = _encode(self.valid(), r)
        return r.choice(
            [
                b"",
                b" ",
                b"null",
                good[: r.randrange(1, max(2, len(good)))],
                bytes(r.randrange(256) for _ in range(64)),
                b"\xef\xbb\xbf" + good,
                good.decode().encode("utf-16"),
                b"\xff\xfe\x00",
                good + b"garbage",
                b'{"prompt": "\xc3\x28"}',
                b"[" * 20,
                b'{"prompt": 1' + b"0" * 5000 + b"}",
            ]
        )

    def cases(self, n: int) -> list[Case]:
        return [self.one() for _ in range(n)]
