"""Load test of `stillroom serve` on loopback against the bare graph, rounds interleaved in one run.

Starts `stillroom serve ARTIFACT` in its own process (or several, ``--server LABEL=SRC``: e.g. this
tree and a ``git archive`` of main, to measure before and after in the same run). For each round,
each concurrency level (1, 4, 16, 64 clients) and each server in turn (the order flips every round)
it holds the load for ``--seconds``, then times the same ONNX graph called directly in this process
(the server's runtime loader, default threads; the best of three 0.5 s windows) at batch 16 and at
the mean batch that server formed. Clients are threads with one keep-alive connection each; the
default client is a minimal HTTP/1.1 one so that the load generator takes little of a small
machine's CPU (``--client httpx``: httpx, which costs 1.5-3 ms of CPU a request at 1-16 clients
and thrashes at 64).

Reported per server and level: images/s (median over rounds), p50 / p99 latency (pooled over
rounds), mean batch, the ratio to the bare graph (median of per-round ratios, each against the bare
graph timed right after), and CPU milliseconds per image of the server process (all threads) next
to the bare graph's. Servers that send a ``Server-Timing`` header also get a breakdown: the mean
milliseconds a request spent in each stage the server timed, and ``http``: the client's latency
minus those stages (uvicorn, ASGI layers, sockets, the client). ``--profile`` records each server
with py-spy under 16 clients in round 1 (``pip install py-spy``; needs ptrace) and summarises the
top functions, overall and on the event loop.

    .venv/bin/python benchmarks/serve_load.py --artifact demo-out/artifacts/mnist-1step \\
        [--server before=/tmp/main-tree --server after=.] [--rounds 3] [--seconds 3] \\
        [--clients 1,4,16,64] [--max-batch 32] [--max-wait-ms 10] [--threads N] [--client httpx] \\
        [--out benchmarks/results/serve_load] [--profile] [--quick]

Without --artifact it builds a tiny class-conditional MNIST-sized generator student, exports it to
ONNX and serves that. ``--quick``: one round of 2 s at 1 and 16 clients (about a minute). Goal
(issue 23): at 16 and 64 clients >= 0.5 x the bare graph's batch-16 images/s, p99 <= 2 x p50, no
errors.
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]


# -- servers ------------------------------------------------------------------------------------------
@dataclass
class Server:
    """One `stillroom serve` process: ``label`` names it in the report, ``src`` is its PYTHONPATH
    (a source tree, plus extra package folders after ``os.pathsep``), ``extra`` more serve options."""

    label: str
    src: str
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    port: int = 0

    def start(self, artifact: Path, args: argparse.Namespace, workdir: Path) -> None:
        self.port = _free_port()
        cmd = [sys.executable, "-m", "stillroom", "serve", str(artifact), "--port", str(self.port)]
        cmd += ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        cmd += self.extra
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "STILLROOM_ORT_SPIN": args.spin}
        env["PYTHONPATH"] = self.src
        # cwd outside the repo: `python -m stillroom` must import the tree PYTHONPATH names
        self.proc = subprocess.Popen(cmd, cwd=workdir, env=env, stderr=subprocess.PIPE, text=True)
        _wait_ready(self.port, self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process (every thread, ONNX Runtime's included)."""
        times = psutil.Process(self.proc.pid).cpu_times()
        return times.user + times.system

    def batch_totals(self) -> tuple[float, float]:
        """(model batches, items in them) so far, from the server's /metrics."""
        text = _get(self.port, "/metrics")
        count = float(re.search(r"^stillroom_batch_size_count\{.*\} (\S+)$", text, re.M).group(1))
        total = float(re.search(r"^stillroom_batch_size_sum\{.*\} (\S+)$", text, re.M).group(1))
        return count, total


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str) -> str:
    conn = Connection(port)
    try:
        return conn.request("GET", path)[2].decode()
    finally:
        conn.close()


def _wait_ready(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            _get(port, "/health")
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit("server did not become ready")


# -- the client ---------------------------------------------------------------------------------------
class Connection:
    """One keep-alive HTTP/1.1 connection with just enough parsing for Content-Length responses."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=120)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {len(body)}\r\n"
        if body:
            head += "Content-Type: application/json\r\n"
        self.sock.sendall(head.encode() + b"\r\n" + body)
        while b"\r\n\r\n" not in self.buf:
            self._read()
        raw, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers["content-length"])
        while len(self.buf) < length:
            self._read()
        payload, self.buf = self.buf[:length], self.buf[length:]
        return int(lines[0].split(" ", 2)[1]), headers, payload

    def _read(self) -> None:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buf += chunk

    def close(self) -> None:
        self.sock.close()


class HttpxConnection:
    """``Connection``'s interface over an ``httpx.Client`` (a heavier client, as users often run)."""

    def __init__(self, port: int) -> None:
        import httpx

        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)

    def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
        headers = {"content-type": "application/json"} if body else None
        r = self.client.request(method, path, content=body, headers=headers)
        return r.status_code, dict(r.headers), r.content

    def close(self) -> None:
        self.client.close()


CLIENTS = {"socket": Connection, "httpx": HttpxConnection}


def _request_body(kind: str, i: int, n: int, output_format: str | None) -> tuple[str, bytes]:
    if kind == "generator":
        body = {"n": n, "class_label": i % 10, "seed": i, "response_format": "b64_json"}
        if output_format:
            body["output_format"] = output_format
        return "/v1/images/generations", json.dumps(body).encode()
    body = {"prompt": "To be, or not", "max_tokens": 16, "temperature": 0, "seed": i}
    return "/v1/completions", json.dumps(body).encode()


def _items(kind: str, payload: bytes) -> int:
    """Images (checked: each decodes from base64) or completion tokens in one 200 response."""
    data = json.loads(payload)
    if kind != "generator":
        return data["usage"]["completion_tokens"]
    for item in data["data"]:
        base64.b64decode(item["b64_json"], validate=True)
    return len(data["data"])


def _server_timing(value: str | None) -> dict[str, float]:
    """``{stage: ms}`` from a ``Server-Timing: name;dur=1.2, ...`` header."""
    out = {}
    for part in (value or "").split(","):
        name, _, dur = part.strip().partition(";dur=")
        if dur:
            out[name] = float(dur)
    return out


@dataclass
class Level:
    """What one concurrency level measured on one server in one round."""

    wall: float = 0.0
    items: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # ms
    stages: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    mean_batch: float = float("nan")
    server_cpu: float = 0.0  # seconds of CPU (all threads) the server used during the level
    client_cpu: float = 0.0  # the same for this process (the clients)
    bare16: float = float("nan")  # the bare graph's images/s at batch 16, timed right after
    bare16_cpu_ms: float = float("nan")  # its CPU milliseconds per image
    bare_at_batch: float = float("nan")  # its images/s at this level's (rounded) mean batch


def run_level(server: Server, kind: str, clients: int, seconds: float, args) -> Level:
    """``clients`` threads send requests back to back for ``seconds``; every answer is checked."""
    level, lock = Level(), threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(index: int) -> None:
        conn = CLIENTS[args.client](server.port)
        k = index
        try:
            while time.perf_counter() < deadline:
                path, body = _request_body(kind, k, args.n, args.output_format)
                k += clients
                start = time.perf_counter()
                status, headers, payload = conn.request("POST", path, body)
                elapsed = (time.perf_counter() - start) * 1000
                if status != 200:
                    with lock:
                        level.errors.append(f"{status} {payload[:200]!r}")
                    continue
                items, stages = _items(kind, payload), _server_timing(headers.get("server-timing"))
                with lock:
                    level.items += items
                    level.latencies.append(elapsed)
                    for name, ms in stages.items():
                        level.stages[name].append(ms)
                    if stages:
                        level.stages["http"].append(elapsed - sum(stages.values()))
        except (OSError, ValueError, KeyError) as err:
            with lock:
                level.errors.append(f"{type(err).__name__}: {err}")
        finally:
            conn.close()

    before = server.batch_totals()
    server_cpu, client_cpu = server.cpu_seconds(), time.process_time()
    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 180)
    level.wall = time.perf_counter() - start
    level.server_cpu = server.cpu_seconds() - server_cpu
    level.client_cpu = time.process_time() - client_cpu
    after = server.batch_totals()
    if after[0] > before[0]:
        level.mean_batch = (after[1] - before[1]) / (after[0] - before[0])
    return level


# -- the bare graph -----------------------------------------------------------------------------------
class BareGraph:
    """The artifact's graph called directly: the server's runtime loader with its default threads."""

    def __init__(self, artifact: Path) -> None:
        from stillroom.serve.runtimes import onnxruntime_runtime

        self.model = onnxruntime_runtime(str(artifact), provider="cpu")
        self.cpu_ms_per_image: dict[int, float] = {}

    def images_per_s(self, batch: int, windows: int = 3, seconds: float = 0.5) -> float:
        """Images/s of back-to-back ``generate`` calls at ``batch``: the best of ``windows`` timings.

        The best window is the reference because background load only ever slows the graph down
        (which makes the server's ratio to it conservative). Also keeps ``cpu_ms_per_image``, this
        process's CPU time per image in that window. Inputs are made once, after one warm-up call.
        """
        noise = self.model.noise(batch, 0)
        labels = np.arange(batch) % (self.model.num_classes or 1)
        labels = labels if self.model.conditioning == "class" else None
        self.model.generate(noise, class_labels=labels)
        best = 0.0
        for _ in range(windows):
            calls, start, cpu = 0, time.perf_counter(), time.process_time()
            while time.perf_counter() - start < seconds:
                self.model.generate(noise, class_labels=labels)
                calls += 1
            rate = calls * batch / (time.perf_counter() - start)
            if rate > best:
                best = rate
                self.cpu_ms_per_image[batch] = (time.process_time() - cpu) * 1000 / (calls * batch)
        return best


# -- profiling ----------------------------------------------------------------------------------------
def start_profile(server: Server, seconds: float, out: Path) -> subprocess.Popen | None:
    """py-spy on the server process for ``seconds``, collapsed stacks to ``out``; None without py-spy."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("py-spy is not installed: no profile (pip install py-spy)", file=sys.stderr)
        return None
    cmd = [spy, "record", "--pid", str(server.proc.pid), "--duration", str(int(seconds))]
    cmd += ["--rate", "250", "--format", "raw", "--output", str(out), "--nonblocking"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def summarise_profile(path: Path, top: int = 25) -> str:
    """Markdown: top functions by own and by inclusive samples, over all threads and on the event loop.

    py-spy samples threads that are running (a thread blocked in a system call such as the event
    loop's ``select`` still counts); ONNX Runtime's own pool threads are native and not sampled.
    """
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if count.isdigit():
            stacks.append(([_short_frame(f) for f in stack.split(";")], int(count)))
    total = sum(n for _, n in stacks)
    loop = [(frames, n) for frames, n in stacks if any("run_forever" in f for f in frames)]
    lines = [
        f"{total} samples; {sum(n for _, n in loop)} of them on the event loop thread "
        "(uvicorn, the ASGI app, the handlers)",
        "",
    ]
    for title, subset in (("all threads", stacks), ("event loop", loop)):
        lines += _top_functions(title, subset, top)
    return "\n".join(lines)


def _top_functions(title: str, stacks: list[tuple[list[str], int]], top: int) -> list[str]:
    own: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    for frames, n in stacks:
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    total = max(sum(n for _, n in stacks), 1)
    for frame in [f for f, n in inclusive.items() if n == total]:  # the thread's entry, in every stack
        del inclusive[frame]
    lines = []
    for kind, counter in (("own", own), ("inclusive", inclusive)):
        lines += [f"| {title}: {kind} % | function |", "|---:|---|"]
        lines += [f"| {100 * n / total:.1f} | `{frame}` |" for frame, n in counter.most_common(top)]
        lines.append("")
    return lines


def _short_frame(frame: str) -> str:
    """``function (path/to/module.py:LINE)`` -> ``function (package/module.py)``."""
    match = re.match(r"(.*) \((.*?):?\d*\)$", frame)
    if not match:
        return frame
    func, path = match.groups()
    parts = Path(path).parts
    anchor = next((i for i, p in enumerate(parts) if p in ("site-packages", "stillroom")), None)
    short = "/".join(parts[anchor + 1 if parts[anchor] == "site-packages" else anchor :]) if anchor else path
    return f"{func} ({short})"


# -- the report ---------------------------------------------------------------------------------------
def summarise(rows: dict[tuple[str, int], list[Level]]) -> list[dict]:
    """One row per (server, clients) over the rounds: medians of rates and ratios, pooled latencies."""
    out = []
    for (label, clients), levels in rows.items():
        lat = np.concatenate([np.asarray(level.latencies) for level in levels])
        rates = np.array([level.items / level.wall for level in levels])
        errors = [e for level in levels for e in level.errors]
        stages = collections.defaultdict(list)
        for level in levels:
            for name, values in level.stages.items():
                stages[name] += values
        p50, p99 = np.percentile(lat, [50, 99]) if lat.size else (float("nan"),) * 2
        out.append(
            {
                "server": label,
                "clients": clients,
                "requests": int(lat.size) + len(errors),
                "errors": len(errors),
                "first_errors": errors[:3],
                "items_s": float(np.median(rates)),
                "p50_ms": float(p50),
                "p99_ms": float(p99),
                "p99_over_p50": float(p99 / p50),
                "mean_batch": float(np.nanmean([level.mean_batch for level in levels])),
                "server_cpu_ms_per_item": _median(1000 * level.server_cpu / level.items for level in levels),
                "client_cpu_ms_per_request": _median(
                    1000 * level.client_cpu / max(len(level.latencies), 1) for level in levels
                ),
                "bare16_items_s": _median(level.bare16 for level in levels),
                "bare16_cpu_ms_per_item": _median(level.bare16_cpu_ms for level in levels),
                "ratio_bare16": _median(
                    rate / level.bare16 for rate, level in zip(rates, levels, strict=True)
                ),
                "bare_at_batch_items_s": _median(level.bare_at_batch for level in levels),
                "ratio_bare_at_batch": _median(
                    rate / level.bare_at_batch for rate, level in zip(rates, levels, strict=True)
                ),
                "stages_ms": {
                    name: float(np.mean(stages[name])) for name in sorted(stages, key=_stage_order)
                },
            }
        )
    return out


def _median(values) -> float:
    return float(np.median(list(values)))


STAGE_ORDER = ("parse", "queue", "assembly", "graph", "handoff", "encode", "serialise", "return", "http")


def _stage_order(name: str) -> int:
    return STAGE_ORDER.index(name) if name in STAGE_ORDER else len(STAGE_ORDER)


def markdown(summary: list[dict], unit: str) -> str:
    """Three tables: throughput and latency against the bare graph, CPU per item, stages."""
    lines = [
        f"| server | clients | requests | errors | {unit} | p50 ms | p99 ms | p99/p50 | mean batch | "
        "bare b16 /s | x bare b16 | bare at batch /s | x bare at batch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary:
        lines.append(
            f"| {r['server']} | {r['clients']} | {r['requests']} | {r['errors']} | {r['items_s']:.0f} | "
            f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['p99_over_p50']:.2f} | {r['mean_batch']:.1f} | "
            f"{r['bare16_items_s']:.0f} | {r['ratio_bare16']:.2f} | {r['bare_at_batch_items_s']:.0f} | "
            f"{r['ratio_bare_at_batch']:.2f} |"
        )
    lines += [
        "",
        "CPU milliseconds per item: the server process (all threads) and the bare graph at batch 16; "
        "the load generator per request:",
        "",
        "| server | clients | server | bare graph b16 | client |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in summary:
        lines.append(
            f"| {r['server']} | {r['clients']} | {r['server_cpu_ms_per_item']:.2f} | "
            f"{r['bare16_cpu_ms_per_item']:.2f} | {r['client_cpu_ms_per_request']:.2f} |"
        )
    staged = [r for r in summary if r["stages_ms"]]
    if staged:
        names = sorted({n for r in staged for n in r["stages_ms"]}, key=_stage_order)
        lines += ["", "Mean milliseconds a request (n=1: an image) spent in each stage of its latency:", ""]
        lines += [f"| server | clients | {' | '.join(names)} |", "|---|---:" + "|---:" * len(names) + "|"]
        for r in staged:
            cells = " | ".join(f"{r['stages_ms'].get(n, float('nan')):.2f}" for n in names)
            lines.append(f"| {r['server']} | {r['clients']} | {cells} |")
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------------------
def _tiny_artifact(root: Path) -> Path:
    sys.path.insert(0, str(REPO))
    from stillroom.plugins.diffusion.export import export_generator
    from stillroom.testing import build_tiny_generator

    student = build_tiny_generator(root / "student", steps=2, size=28)
    export_generator(student, root / "artifact")
    return root / "artifact"


def _parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path)
    ap.add_argument(
        "--server",
        action="append",
        metavar="LABEL=SRC[;OPTIONS]",
        help="serve from source tree SRC (a PYTHONPATH) under LABEL, with extra `stillroom serve` "
        "OPTIONS (repeatable; default: this tree, as 'this tree')",
    )
    ap.add_argument("--clients", default="1,4,16,64", help="comma-separated concurrency levels")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0, help="load per level, server and round")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=10.0)
    ap.add_argument("--threads", type=int, help="the servers' onnxruntime intra-op threads")
    ap.add_argument("--spin", default="0", choices=["0", "1"], help="STILLROOM_ORT_SPIN for both")
    ap.add_argument("--client", choices=sorted(CLIENTS), default="socket", help="the HTTP client")
    ap.add_argument("--n", type=int, default=1, help="images per request")
    ap.add_argument("--output-format", help="the output_format extension to request (default: png)")
    ap.add_argument("--out", type=Path, help="write summary.json, table.md (and profiles) here")
    ap.add_argument("--profile", action="store_true", help="py-spy each server at 16 clients, round 1")
    ap.add_argument("--quick", action="store_true", help="1 round of 2 s at 1 and 16 clients")
    args = ap.parse_args()
    args.server = args.server or [f"this tree={REPO}"]
    if args.quick:
        args.rounds, args.seconds, args.clients = 1, 2.0, "1,16"
    os.environ["STILLROOM_ORT_SPIN"] = args.spin
    return args


def main() -> None:
    args = _parse_args()
    servers = [_server(spec) for spec in args.server]
    with tempfile.TemporaryDirectory() as tmp:
        artifact = (args.artifact or _tiny_artifact(Path(tmp))).resolve()
        kind = json.loads((artifact / "manifest.json").read_text())["kind"]
        try:
            for server in servers:
                server.start(artifact, args, Path(tmp))
                run_level(server, kind, 4, 1.0, args)  # warm-up
            rows, profiles = measure(servers, kind, artifact, args)
        finally:
            for server in servers:
                server.stop()
    summary = summarise(rows)
    table = markdown(summary, "images/s" if kind == "generator" else "tokens/s")
    print(table)
    if args.out:
        write_results(args, summary, table, profiles)


def _server(spec: str) -> Server:
    """``LABEL=SRC[;SERVE OPTIONS]`` -> Server."""
    label, _, rest = spec.partition("=")
    src, _, extra = rest.partition(";")
    path = os.pathsep.join(str(Path(part).resolve()) for part in src.split(os.pathsep))
    return Server(label, path, extra.split())


def measure(servers: list[Server], kind: str, artifact: Path, args) -> tuple[dict, dict[str, Path]]:
    """Rounds x levels x servers (order flipped every round), each followed by the bare graph."""
    bare = BareGraph(artifact) if kind == "generator" else None
    rows: dict[tuple[str, int], list[Level]] = collections.defaultdict(list)
    profiles: dict[str, Path] = {}
    for rnd in range(args.rounds):
        for clients in [int(c) for c in args.clients.split(",")]:
            for server in servers if rnd % 2 == 0 else servers[::-1]:
                spy = None
                if args.profile and args.out and rnd == 0 and clients == 16:
                    args.out.mkdir(parents=True, exist_ok=True)
                    profiles[server.label] = args.out / f"profile-{_slug(server.label)}-16.txt"
                    spy = start_profile(server, args.seconds, profiles[server.label])
                level = run_level(server, kind, clients, args.seconds, args)
                if spy is not None:
                    spy.wait(timeout=60)
                if bare is not None:
                    time_bare_graph(bare, level)
                rows[(server.label, clients)].append(level)
                print(
                    f"round {rnd + 1} {server.label} {clients} clients: "
                    f"{level.items / level.wall:.0f}/s, batch {level.mean_batch:.1f}, "
                    f"bare b16 {level.bare16:.0f}/s, errors {len(level.errors)}",
                    file=sys.stderr,
                )
    return rows, profiles


def time_bare_graph(bare: BareGraph, level: Level) -> None:
    """The bare graph at batch 16 and at the (rounded) mean batch the server formed, into ``level``."""
    level.bare16 = bare.images_per_s(16)
    level.bare16_cpu_ms = bare.cpu_ms_per_image[16]
    batch = max(1, round(level.mean_batch)) if level.mean_batch == level.mean_batch else 16  # nan: none
    level.bare_at_batch = level.bare16 if batch == 16 else bare.images_per_s(batch)


def write_results(args, summary: list[dict], table: str, profiles: dict[str, Path]) -> None:
    """summary.json (setup and rows), table.md and a markdown summary of each py-spy profile."""
    args.out.mkdir(parents=True, exist_ok=True)
    setup = {k: str(v) for k, v in vars(args).items()}
    setup["loadavg_end"] = os.getloadavg()
    (args.out / "summary.json").write_text(json.dumps({"setup": setup, "rows": summary}, indent=2) + "\n")
    (args.out / "table.md").write_text(table + "\n")
    for label, path in profiles.items():
        if path.exists():
            (args.out / f"profile-{_slug(label)}-16.md").write_text(summarise_profile(path) + "\n")


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


if __name__ == "__main__":
    main()
