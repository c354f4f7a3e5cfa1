"""``stillroom export SRC --to NAME``: the command and the built-in exporters (onnx, tensorrt, triton).

Every exporter has the signature ``fn(src, out, **options) -> Artifact`` and ignores options it does
not use; ``--to`` offers whatever the host has registered, a plugin's exporter included. TensorRT and
Triton start from an ONNX artifact: when SRC is not one already, the ONNX export (validated) is made
first. TensorRT keeps it in ``<out>/onnx`` and builds the engine into ``<out>/tensorrt``; Triton makes
it in a temporary sibling of ``<out>`` and builds the repository into ``<out>`` itself, which must hold
only model folders (``stillroom.export.triton``).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import click

from stillroom.core.errors import StillroomError
from stillroom.core.host import get_host
from stillroom.core.registry_choice import RegistryChoice

log = logging.getLogger(__name__)
_status: Any = None  # the spinner of a running `stillroom export`; None when exporting through the API


def _stage(text: str) -> None:
    """Names the running stage on the command's spinner: an export can spend minutes in one."""
    if _status is not None:
        _status.update(f"[bold]{text}")


def _is_artifact(path: Path) -> bool:
    return (Path(path) / "manifest.json").is_file()


def to_onnx(src, out, **options: Any):
    """The family that recognises ``src`` exports it (``Family.export_onnx``)."""
    from stillroom.core.source import detect

    source = detect(src)
    _stage(f"exporting and validating the {source.kind} ONNX graph")
    return get_host().family_of_kind(source.kind).export_onnx(Path(src), Path(out), **options)


def _onnx_first(src, out: Path, **options):
    """``src`` itself when it is an artifact, else its ONNX export into ``<out>/onnx``."""
    from stillroom.core import artifact

    if _is_artifact(Path(src)):
        return artifact.load(src)
    return to_onnx(src, Path(out) / "onnx", **options)


def to_tensorrt(src, out, *, profile: tuple[str, ...] = (), **options):
    from stillroom.export import tensorrt

    tensorrt.require()
    onnx_art = _onnx_first(src, out, **{k: v for k, v in options.items() if k != "int8"})
    precision = "fp16" if options.get("fp16") else "int8" if options.get("int8") else "fp32"
    _stage(f"building the {precision} TensorRT engine")
    return tensorrt.build(
        onnx_art,
        Path(out) / "tensorrt",
        precision=precision,
        profile_overrides=tensorrt.parse_profiles(profile),
    )


def to_triton(src, out, *, name: str | None = None, instances: int = 1, max_batch: int = 8, **options):
    """The Triton model repository ``out``; an ONNX export it needs first is staged beside ``out``
    (``.OUT.*.tmp``, which ``run_exporter`` clears if a killed export left it) and removed after."""
    import tempfile

    from stillroom.export import triton

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent) as staging:
        source_art = _onnx_first(src, Path(staging), **options)
        _stage("writing the Triton model repository")
        return triton.write_repository(
            source_art, out, name=name, instances=instances, max_batch_size=max_batch
        )


def run_exporter(src, out, to: str = "onnx", with_teacher: bool = False, **options: Any):
    """Clears what an interrupted export of ``out`` left, then runs the exporter registered as ``to``;
    ``with_teacher`` copies the student's teacher into the artifact (``export.teacher``)."""
    exporter = get_host().exporter(to)
    if with_teacher and to == "triton":
        raise StillroomError(
            "--with-teacher does not apply to a Triton repository (Triton would load teacher/ as a model)",
            "bundle the teacher with the onnx artifact: `stillroom export RUN --to onnx --with-teacher`",
        )
    _remove_interrupted(Path(out))
    art = exporter(src, out, **options)
    if with_teacher:
        from stillroom.export import teacher

        _stage("copying the teacher into the artifact")
        art = teacher.bundle(art)
    return art


def _remove_interrupted(out: Path) -> None:
    """Deletes what a killed export of ``out`` left beside it: ``.OUT.*.tmp`` staging and ``.OUT.old``."""
    parent = Path(out).parent
    if not parent.is_dir():
        return
    for entry in parent.glob(f".{Path(out).name}.*"):
        if entry.is_dir() and (entry.name.endswith(".tmp") or entry.name == f".{Path(out).name}.old"):
            log.info("removing %s, left by an interrupted export", entry)
            shutil.rmtree(entry, ignore_errors=True)


@click.command()
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--to",
    "target",
    type=RegistryChoice("exporters"),
    default="onnx",
    show_default=True,
    help="What to build: a registered exporter.",
)
@click.option(
    "--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output directory."
)
@click.option(
    "--with-teacher",
    is_flag=True,
    help="Copy the student's teacher into ARTIFACT/teacher, so `stillroom bench` compares with it anywhere.",
)
@click.option("--steps", type=int, default=None, help="Generators: re-target the sampler to K steps.")
@click.option("--int8", is_flag=True, help="ORT dynamic int8 quantization (CPU), validated at task level.")
@click.option("--fp16", is_flag=True, help="float16 graph (for GPUs), validated at task level.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default: the exporter's).")
@click.option("--optimize", is_flag=True, help="Apply onnxruntime.transformers fusions (validated).")
@click.option(
    "--fused",
    is_flag=True,
    help="LMs (Llama/Mistral/Qwen2): build the graph from ORT fused ops (GroupQueryAttention, ...).",
)
@click.option("--last-logits", is_flag=True, help="LMs: compute the vocabulary projection only where needed.")
@click.option(
    "--weight-only",
    type=click.Choice(["int4", "int8"]),
    default=None,
    help="LMs: weight-only quantisation with ORT MatMulNBits, validated at task level.",
)
@click.option("--profile", multiple=True, help="TensorRT: DIM=MIN:OPT:MAX, e.g. batch_size=1:4:16.")
@click.option(
    "--name", default=None, help="Triton: model name (default: the run's method and family, e.g. kd_lm)."
)
@click.option("--instances", type=int, default=1, show_default=True, help="Triton: instances per device.")
@click.option("--max-batch", type=int, default=8, show_default=True, help="Triton: max_batch_size.")
def export(src: Path, target: str, out: Path, **options: Any) -> None:
    """Export SRC (a distill run, an LM directory or a generator student) as a validated artifact."""
    from stillroom.export.inspect import brief, stdout_console

    global _status
    with _log_console().status(f"[bold]exporting {src} ({target})") as status:
        _status = status
        try:
            art = run_exporter(src, out, target, **options)
        finally:
            _status = None
    stdout_console().print(brief(art))


def _log_console():
    """The console the CLI logs to (``stillroom.cli`` keeps it in the context), so that the spinner and
    the log lines share one live display; two consoles on one terminal overwrite each other's lines."""
    from rich.console import Console

    obj = click.get_current_context().find_root().obj
    return (obj or {}).get("console") or Console(stderr=True)
