"""Load test of `stillroom serve` for an LM: static vs continuous batching, same artifact, one run.

Starts two servers of the artifact, each in its own process (this script's ``serve`` mode: the app
of ``stillroom serve`` with ``ServerSettings.continuous_batching`` off or on), ``--max-batch 16``.
16 client threads, each with its own keep-alive connection, send streamed greedy completions back to
back; client i sends prompts of about 8 or 128 tokens (``i % 2``) and asks for 8 or 128 tokens
(``i // 2 % 2``), so each of the four kinds has four clients. A round loads each server in turn (the
order flips every round) for ``--warmup`` + ``--seconds``; the clients then finish the requests
they have in flight before the other server's turn.

Reported per mode: generated tokens/s (the server's ``stillroom_generated_tokens_total`` over the
measured window, median over rounds), completed requests/s and prompt tokens/s (same window), and
time to first token on the client side (request sent to the first streamed event) p50 / p99 of the
short requests (8 tokens asked for) and of the long ones, pooled over rounds, over the requests sent
in the window. Goal (issue 17): continuous >= 2x the static tokens/s, and the short requests' p99
TTFT under continuous batching <= 1/3 of static.

    .venv/bin/python benchmarks/serve_lm_load.py [--artifact DIR | --variant kv-cache|fused] \\
        [--rounds 3] [--seconds 20] [--warmup 3] [--threads N] [--out benchmarks/results/serve_lm_load]

Without ``--artifact`` it exports the embedded LM teacher (``embedded:lm_teacher``: Llama, 4 layers,
hidden 256, trained on Shakespeare) as ``--variant`` into a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODES = ("static", "continuous")
SHORT, LONG = 8, 128


# -- the server (child process) -------------------------------------------------------------------------
def serve(args: argparse.Namespace) -> None:
    """``serve`` mode: the app of `stillroom serve` over the artifact, static or continuous."""
    from stillroom.serve.runtimes import onnxruntime_runtime
    from stillroom.serve.server.app import ServerSettings, create_app
    from stillroom.serve.server.run import serve_forever

    model = onnxruntime_runtime(args.artifact, provider="cpu", intra_op_threads=args.threads, name="bench")
    settings = ServerSettings(
        max_batch=args.max_batch, max_tokens_limit=LONG, continuous_batching=args.batching == "continuous"
    )
    serve_forever(create_app(model, settings), port=args.port)


@dataclass
class Server:
    mode: str
    proc: subprocess.Popen | None = None
    url: str = ""

    def start(self, artifact: Path, args: argparse.Namespace) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, __file__, "serve", str(artifact), "--port", str(port), "--batching", self.mode]
        cmd += ["--max-batch", str(args.max_batch)] + (
            ["--threads", str(args.threads)] if args.threads else []
        )
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the {self.mode} server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                httpx.get(f"{self.url}/health", timeout=2)
                return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise SystemExit(f"the {self.mode} server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)

    def counters(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return {
            name: float(re.search(rf"^stillroom_{name}_total\{{.*\}} (\S+)$", text, re.M).group(1))
            for name in ("generated_tokens", "prompt_tokens")
        }


# -- the clients ----------------------------------------------------------------------------------------
@dataclass
class Round:
    mode: str
    seconds: float = 0.0
    generated: float = 0.0
    prompt: float = 0.0
    completed: int = 0
    ttft: dict[int, list[float]] = field(default_factory=lambda: {SHORT: [], LONG: []})
    errors: list[str] = field(default_factory=list)


def prompts(artifact: Path) -> list[list[str]]:
    """Per client, a cycle of prompt texts of about 8 (even clients) or 128 tokens (odd clients)."""
    from stillroom.core.tokenizer import load_tokenizer
    from stillroom.data import heldout_text

    tokenizer = load_tokenizer(artifact / "tokenizer")
    ids = tokenizer(heldout_text()[:200_000], add_special_tokens=False)["input_ids"]
    out = []
    for client in range(16):
        n = SHORT if client % 2 == 0 else LONG
        starts = [(client * 7919 + k * 104_729) % (len(ids) - n) for k in range(64)]
        out.append([tokenizer.decode(ids[s : s + n]) for s in starts])
    return out


def load(server: Server, texts: list[list[str]], warmup: float, seconds: float) -> Round:
    """16 clients for ``warmup + seconds``; the counters and requests of the last ``seconds``."""
    result, lock = Round(server.mode), threading.Lock()
    start = time.perf_counter() + warmup
    end = start + seconds
    window: dict[str, dict[str, float]] = {}

    def client(i: int) -> None:
        max_tokens = SHORT if (i // 2) % 2 == 0 else LONG
        with httpx.Client(base_url=server.url, timeout=300) as http:
            k = 0
            while (sent := time.perf_counter()) < end:
                body = {"prompt": texts[i][k % len(texts[i])], "max_tokens": max_tokens, "temperature": 0}
                k += 1
                first = None
                try:
                    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                        for _ in r.iter_raw():
                            first = first or time.perf_counter()
                        ok = r.status_code == 200
                except httpx.HTTPError as err:
                    ok, first = False, f"{type(err).__name__}: {err}"
                done = time.perf_counter()
                with lock:
                    if not ok:
                        result.errors.append(str(first)[:200])
                    elif sent >= start:
                        result.ttft[max_tokens].append(first - sent)
                    if start <= done < end:
                        result.completed += 1

    def mark(name: str, at: float) -> None:
        time.sleep(max(0.0, at - time.perf_counter()))
        window[name] = server.counters()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    marks = [threading.Thread(target=mark, args=(name, at)) for name, at in (("start", start), ("end", end))]
    for thread in threads + marks:
        thread.start()
    for thread in threads + marks:
        thread.join()
    result.seconds = seconds
    result.generated = window["end"]["generated_tokens"] - window["start"]["generated_tokens"]
    result.prompt = window["end"]["prompt_tokens"] - window["start"]["prompt_tokens"]
    return result


# -- the report ---------------------------------------------------------------------------------------
def summarise(rounds: list[Round]) -> dict[str, dict]:
    out = {}
    for mode in MODES:
        mine = [r for r in rounds if r.mode == mode]
        ttft = {n: np.array([t for r in mine for t in r.ttft[n]]) * 1000 for n in (SHORT, LONG)}
        out[mode] = {
            "tokens_per_s": float(np.median([r.generated / r.seconds for r in mine])),
            "tokens_per_s_rounds": [round(r.generated / r.seconds, 1) for r in mine],
            "requests_per_s": float(np.median([r.completed / r.seconds for r in mine])),
            "prompt_tokens_per_s": float(np.median([r.prompt / r.seconds for r in mine])),
            **{
                f"ttft_{kind}_ms": {
                    "p50": float(np.percentile(ttft[n], 50)),
                    "p99": float(np.percentile(ttft[n], 99)),
                    "n": int(ttft[n].size),
                }
                for kind, n in (("short", SHORT), ("long", LONG))
            },
            "errors": sum(len(r.errors) for r in mine),
            "first_errors": [e for r in mine for e in r.errors][:3],
        }
    static, cont = out["static"], out["continuous"]
    out["ratios"] = {
        "tokens_per_s_continuous_over_static": cont["tokens_per_s"] / static["tokens_per_s"],
        "ttft_short_p99_continuous_over_static": cont["ttft_short_ms"]["p99"]
        / static["ttft_short_ms"]["p99"],
    }
    return out


def table(summary: dict[str, dict]) -> str:
    head = ["batching", "tokens/s", "requests/s", "prompt tokens/s", "TTFT short p50 / p99 ms"]
    head += ["TTFT long p50 / p99 ms", "errors"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for mode in MODES:
        row = summary[mode]
        short, long = row["ttft_short_ms"], row["ttft_long_ms"]
        cells = [mode, f"{row['tokens_per_s']:.0f}", f"{row['requests_per_s']:.1f}"]
        cells += [f"{row['prompt_tokens_per_s']:.0f}", f"{short['p50']:.0f} / {short['p99']:.0f}"]
        cells += [f"{long['p50']:.0f} / {long['p99']:.0f}", str(row["errors"])]
        lines.append("| " + " | ".join(cells) + " |")
    ratios = summary["ratios"]
    lines += [
        "",
        f"continuous / static tokens/s: {ratios['tokens_per_s_continuous_over_static']:.2f} (goal >= 2); "
        f"short-request p99 TTFT continuous / static: {ratios['ttft_short_p99_continuous_over_static']:.2f} "
        "(goal <= 0.33)",
    ]
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------------------
def export_teacher(root: Path, variant: str) -> Path:
    from stillroom.data import resolve
    from stillroom.plugins.lm.export.onnx_artifact import export_causal_lm

    options = {"fused": {"fused": True}, "kv-cache-last-logits": {"last_logits": True}}.get(variant, {})
    return export_causal_lm(resolve("embedded:lm_teacher"), root / variant, **options).root


def _parse_args() -> argparse.Namespace:
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        ap = argparse.ArgumentParser(prog="serve_lm_load.py serve")
        ap.add_argument("artifact", type=Path)
        ap.add_argument("--port", type=int, required=True)
        ap.add_argument("--batching", choices=MODES, required=True)
        ap.add_argument("--max-batch", type=int, default=16)
        ap.add_argument("--threads", type=int)
        args = ap.parse_args(sys.argv[2:])
        args.command = "serve"
        return args
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--artifact", type=Path, help="an ONNX LM artifact (default: export the embedded teacher)"
    )
    ap.add_argument("--variant", default="kv-cache", choices=["kv-cache", "kv-cache-last-logits", "fused"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, help="onnxruntime intra-op threads of each server")
    ap.add_argument("--out", type=Path, help="write SUMMARY.json and .md here, named after the variant")
    args = ap.parse_args()
    args.command = "load"
    return args


def main() -> None:
    args = _parse_args()
    if args.command == "serve":
        serve(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        artifact = args.artifact or export_teacher(Path(tmp), args.variant)
        servers = [Server(mode) for mode in MODES]
        try:
            for server in servers:
                server.start(artifact, args)
            texts = prompts(artifact)
            rounds = []
            for rnd in range(args.rounds):
                for server in servers if rnd % 2 == 0 else servers[::-1]:
                    result = load(server, texts, args.warmup, args.seconds)
                    rounds.append(result)
                    print(
                        f"round {rnd + 1} {server.mode}: {result.generated / result.seconds:.0f} tokens/s, "
                        f"{result.completed / result.seconds:.1f} requests/s, errors {len(result.errors)}",
                        file=sys.stderr,
                    )
        finally:
            for server in servers:
                server.stop()
        variant = json.loads((artifact / "manifest.json").read_text())["variant"]
    summary = summarise(rounds)
    report = table(summary)
    print(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        setup = {k: str(v) for k, v in vars(args).items()} | {"variant": variant, "loadavg": os.getloadavg()}
        (args.out / f"{variant}.json").write_text(json.dumps({"setup": setup, **summary}, indent=2) + "\n")
        (args.out / f"{variant}.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
