"""The ``stillroom bench`` and ``stillroom serve`` commands."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from stillroom.core.errors import StillroomError
from stillroom.core.host import get_host
from stillroom.core.registry_choice import RegistryChoice

log = logging.getLogger("stillroom")


def _runtime_options(
    provider: str | None, allow_fallback: bool, threads: int | None, device: str | None, compile_: bool
) -> dict[str, dict[str, Any]]:
    ort: dict[str, Any] = {}
    if provider:
        ort["provider"] = provider
    if allow_fallback:
        ort["allow_fallback"] = True
    if threads:
        ort["intra_op_threads"] = threads
    torch_opts: dict[str, Any] = {}
    if device:
        torch_opts["device"] = device
    if compile_:
        torch_opts["compile"] = True
    return {"onnxruntime": ort, "torch": torch_opts}


@click.command()
@click.argument("artifact", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--teacher", help="Teacher spec (default: the teacher the artifact's student was distilled from)."
)
@click.option(
    "--runtime",
    "runtimes",
    type=RegistryChoice("runtimes", separator=","),
    multiple=True,
    default=("onnxruntime",),
    show_default=True,
    help="Registered runtime(s) for the student; repeat or comma-separate.",
)
@click.option("--batch", "batch", default="1,8", show_default=True, help="Comma-separated batch sizes.")
@click.option(
    "--warmup", default=2, show_default=True, type=click.IntRange(0), help="Untimed calls before timing."
)
@click.option(
    "--repeats", default=10, show_default=True, type=click.IntRange(1), help="Timed calls per batch size."
)
@click.option(
    "--new-tokens", default=32, show_default=True, type=click.IntRange(1), help="LMs: tokens per call."
)
@click.option(
    "--prompt-tokens",
    default=32,
    show_default=True,
    type=click.IntRange(1),
    help="Token-by-token models: prompt length of the timed calls.",
)
@click.option(
    "--samples",
    default=200,
    show_default=True,
    type=click.IntRange(1),
    help="Generators: images scored for quality.",
)
@click.option(
    "--metric",
    "metrics",
    type=RegistryChoice("metrics", separator=","),
    multiple=True,
    help="Registered quality metric(s) to run (default: the family's own); repeat or comma-separate.",
)
@click.option("--teacher-steps", type=click.IntRange(1), help="Diffusion teachers: DDIM steps (default 50).")
@click.option(
    "--provider", type=click.Choice(["auto", "tensorrt", "cuda", "cpu"]), help="onnxruntime provider."
)
@click.option("--allow-fallback", is_flag=True, help="Accept onnxruntime falling back to another provider.")
@click.option("--threads", type=click.IntRange(1), help="onnxruntime intra-op threads.")
@click.option("--device", help="torch device (cpu, cuda, auto).")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the torch runtime's models.")
@click.option(
    "--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Report directory."
)
def bench(
    artifact: Path,
    teacher: str | None,
    runtimes: tuple[tuple[str, ...], ...],
    batch: str,
    warmup: int,
    repeats: int,
    new_tokens: int,
    prompt_tokens: int,
    samples: int,
    metrics: tuple[tuple[str, ...], ...],
    teacher_steps: int | None,
    provider: str | None,
    allow_fallback: bool,
    threads: int | None,
    device: str | None,
    compile_: bool,
    out: Path,
) -> None:
    """Benchmark ARTIFACT against its teacher: latency, throughput, memory and quality side by side."""
    from stillroom.core.bench_plan import BenchSettings
    from stillroom.serve.bench import parse_batches, run_bench

    names = [name for group in runtimes for name in group]
    settings = BenchSettings(
        batches=parse_batches(batch),
        warmup=warmup,
        repeats=repeats,
        new_tokens=new_tokens,
        prompt_tokens=prompt_tokens,
        quality_samples=samples,
        metrics=[name for group in metrics for name in group],
    )
    options = _runtime_options(provider, allow_fallback, threads, device, compile_)
    teacher_options = {"steps": teacher_steps} if teacher_steps else {}
    if device:
        teacher_options["device"] = device
    with _target_progress():
        report = run_bench(
            artifact,
            out,
            teacher=teacher,
            runtimes=names,
            settings=settings,
            options=options,
            teacher_options=teacher_options,
        )
    log_report(report, out)


@contextmanager
def _target_progress() -> Iterator[None]:
    """A spinner with the elapsed time of the target being measured, and a line with its time when done.

    ``serve.bench`` logs one INFO line (naming the target) as each target's process starts; that line
    marks the end of the previous target, and leaving the block the end of the last. The live line
    is transient and drawn only on a terminal; the "measured in" lines are ordinary log lines.
    """
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    obj = click.get_current_context().find_root().obj
    console = (obj or {}).get("console") or Console(stderr=True)  # the CLI's, shared with the log lines
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,  # rich's Progress would print a blank line into a pipe
    )
    current: list[tuple[str, float, Any]] = []

    def finish() -> None:
        if current:
            label, start, task = current.pop()
            progress.remove_task(task)
            log.info("%s measured in %.1f s", label, time.perf_counter() - start)

    def on_record(record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO:
            finish()
            label = str(record.args[0]) if isinstance(record.args, tuple) and record.args else "target"
            current.append((label, time.perf_counter(), progress.add_task(f"measuring {label}")))
        return True

    bench_log = logging.getLogger("stillroom.serve.bench")
    bench_log.addFilter(on_record)
    try:
        with progress:
            yield
            finish()
    finally:
        bench_log.removeFilter(on_record)


def log_report(report: dict[str, Any], out: Path) -> None:
    """What a finished benchmark says: failed targets, then one rounded row per student (p50 latency,
    speedup, the family's primary metric beside the teacher's at the same batch size), then where
    the full report is."""
    from rich.console import Console
    from rich.table import Table

    from stillroom.serve.report import format_value

    family = get_host().family_of_kind(report["kind"])
    if not family.exports:  # its bench_output logged its own table
        log.info("report in %s", out / "report.html")
        return
    metric = family.metric
    teacher = {r["batch"]: r for r in (report.get("teacher") or {}).get("by_batch") or [] if "error" not in r}
    table = Table("student", "runtime", "batch", "p50 ms", "speedup", metric, f"teacher {metric}")
    for row in report["students"]:
        if "error" in row:
            log.error("%s [%s]: %s", row["name"], row["runtime"], row["error"])
            continue
        reference = teacher.get(row["batch"], {}).get("quality", {})
        table.add_row(
            row["name"],
            row["runtime"],
            str(row["batch"]),
            format_value(row["latency_ms"]["p50"]),
            format_value(row.get("speedup_p50")),
            format_value(row["quality"].get(metric)),
            format_value(reference.get(metric)),
        )
    if table.row_count:
        Console().print(table)
    log.info(
        "best speedup p50: %s; report in %s", format_value(report.get("speedup_p50")), out / "report.html"
    )


@click.command()
@click.argument("artifact", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--runtime",
    type=RegistryChoice("runtimes"),
    default="onnxruntime",
    show_default=True,
    help="A registered runtime.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (loopback by default).")
@click.option(
    "--port",
    default=8000,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="TCP port (0: any free one).",
)
@click.option(
    "--api-key",
    envvar="STILLROOM_API_KEY",
    help="Require 'Authorization: Bearer KEY' (or set STILLROOM_API_KEY).",
)
@click.option(
    "--max-batch",
    default=8,
    show_default=True,
    type=click.IntRange(1, 1024),
    help="Most rows (LM choices, images) in one batch; LM requests join the running batch between steps.",
)
@click.option(
    "--max-queue",
    default=256,
    show_default=True,
    type=click.IntRange(1),
    help="Most requests waiting for the model; more are refused (429 with Retry-After).",
)
@click.option(
    "--max-wait-ms",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0, 10_000),
    help="Most a batch waits for company: image batches (adaptive, never for a lone client) and LMs "
    "batched statically (torch / TensorRT runtimes); continuous LM batching never waits.",
)
@click.option(
    "--max-body-bytes",
    default=1 << 20,
    show_default=True,
    type=click.IntRange(1),
    help="Larger request bodies are refused (413).",
)
@click.option(
    "--timeout",
    "timeout_s",
    default=120.0,
    show_default=True,
    type=click.FloatRange(0.1),
    help="Per-request timeout in seconds.",
)
@click.option(
    "--max-tokens-limit",
    default=512,
    show_default=True,
    type=click.IntRange(1),
    help="Largest max_tokens a request may ask for.",
)
@click.option("--name", help="Model id in the API (default: the artifact directory name).")
@click.option(
    "--provider", type=click.Choice(["auto", "tensorrt", "cuda", "cpu"]), help="onnxruntime provider."
)
@click.option("--allow-fallback", is_flag=True, help="Accept onnxruntime falling back to another provider.")
@click.option("--threads", type=click.IntRange(1), help="onnxruntime intra-op threads.")
@click.option(
    "--metrics-auth",
    is_flag=True,
    help="Require the API key on /health, /ready, /metrics and the docs too (by default they are open).",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Log lines (the access log included) as text, or as one JSON object per line.",
)
@click.option(
    "--grace",
    default=30.0,
    show_default=True,
    type=click.FloatRange(0),
    help="On SIGTERM, seconds in-flight requests get to finish (new connections are refused at once).",
)
def serve(
    artifact: Path,
    runtime: str,
    host: str,
    port: int,
    api_key: str | None,
    max_batch: int,
    max_queue: int,
    max_wait_ms: float,
    max_body_bytes: int,
    timeout_s: float,
    max_tokens_limit: int,
    name: str | None,
    provider: str | None,
    allow_fallback: bool,
    threads: int | None,
    metrics_auth: bool,
    log_format: str,
    grace: float,
) -> None:
    """Serve ARTIFACT over an OpenAI-shaped HTTP API (continuous batching for LMs, micro-batching for images).

    One access-log line per request; SIGTERM stops accepting, lets in-flight requests finish for up
    to --grace seconds and exits 0.
    """
    try:
        from stillroom.serve.server.access import log_as_json
        from stillroom.serve.server.app import ServerSettings, create_app
        from stillroom.serve.server.run import serve_forever
    except ImportError as err:  # fastapi / uvicorn come with the serve extra, not the base install
        raise StillroomError(
            f"stillroom serve needs the HTTP stack, which is not installed ({err.name})",
            "pip install 'stillroom[serve]'",
        ) from None

    if log_format == "json":
        log_as_json()
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning(
            "serving on %s without --api-key: anyone who can reach this address can use the model", host
        )
    options: dict[str, Any] = {"name": name or artifact.resolve().name}
    if runtime == "onnxruntime":
        options.update(_runtime_options(provider, allow_fallback, threads, None, False)["onnxruntime"])
    elif provider or threads:
        raise StillroomError("--provider/--threads apply to the onnxruntime runtime", "drop them or use it")
    model = get_host().runtime(runtime)(str(artifact), **options)
    settings = ServerSettings(
        api_key=api_key,
        max_batch=max_batch,
        max_queue=max_queue,
        max_wait_ms=max_wait_ms,
        max_body_bytes=max_body_bytes,
        request_timeout_s=timeout_s,
        max_tokens_limit=max_tokens_limit,
        metrics_auth=metrics_auth,
    )
    log.info("serving %s (%s on %s) at http://%s:%d", model.name, model.kind, model.provider, host, port)
    serve_forever(create_app(model, settings), host, port, grace)
