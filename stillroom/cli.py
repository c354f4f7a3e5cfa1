"""The ``stillroom`` command. Plugins add subcommands through the ``register_commands`` hook.

Errors a user can cause are one line on stderr and exit status 1; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path

import click

from stillroom import __version__
from stillroom.core.errors import StillroomError
from stillroom.core.host import KINDS, get_host


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="stillroom")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Distill big, slow teachers into small, fast students; export, benchmark and serve them."""
    obj = ctx.ensure_object(dict)
    obj["debug"] = debug
    obj["console"] = _setup_logging(debug)  # commands draw their progress on the log lines' console


def _setup_logging(debug: bool):
    """Logs go to stderr through rich; without ``--debug`` the terminal shows stillroom's own lines only.

    Libraries' Python warnings (torch's TracerWarning, onnxscript's and transformers' Deprecation- and
    FutureWarnings) say nothing a user can act on, so they are ignored here, in the command, never in
    library code that others import; PYTHONWARNINGS carries that to child processes such as the
    bench workers. ``--debug`` leaves every filter as Python set it.
    """
    if not debug:  # library chatter (tokenizer length hints, "install accelerate") is not for users
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        os.environ.setdefault("TORCH_LOGS", "-onnx")  # torch resets torch.onnx's level when imported
        os.environ.setdefault("PYTHONWARNINGS", "ignore")
        warnings.simplefilter("ignore")
    from rich.console import Console
    from rich.logging import RichHandler

    console = Console(stderr=True)
    handler = RichHandler(console=console, show_path=debug, rich_tracebacks=debug)
    # stillroom's own loggers speak at INFO; libraries (onnxruntime's quantizer logs a line per bias it
    # copies to the root logger, httpx one per request) only from WARNING, unless --debug
    level = logging.DEBUG if debug else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)
    logging.getLogger("stillroom").setLevel(logging.DEBUG if debug else logging.INFO)
    for noisy in ("httpx", "urllib3", "filelock", "matplotlib", "PIL", "onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.WARNING)  # even with --debug: request and file chatter
    return console


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def plugins(as_json: bool) -> None:
    """List built-in and installed plugins and what they registered."""
    infos = get_host().infos()
    if as_json:
        click.echo(json.dumps([info.as_json() for info in infos], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("plugin", "version", *KINDS, "status")
    for info in infos:
        status = f"[red]error: {info.error}" if info.error else ("built-in" if info.builtin else "installed")
        table.add_row(info.name, info.version or "", *(", ".join(getattr(info, k)) for k in KINDS), status)
    console = Console()
    if not console.is_terminal:  # a pipe or a log: do not squeeze eight columns into 80
        console = Console(width=160)
    console.print(table)


@cli.command()
def recipes() -> None:
    """List the recipes shipped with stillroom (usable by name in `stillroom distill` and `stillroom run`)."""
    from rich.console import Console
    from rich.table import Table

    from stillroom.core.recipe import load_yaml, named_recipes

    table = Table("name", "method", "description")
    for name, path in sorted(named_recipes().items()):
        data = load_yaml(path)
        table.add_row(name, str((data.get("method") or {}).get("name", "")), str(data.get("description", "")))
    Console().print(table)


RUN_DIR = click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Run directory (default: runs/<recipe name>).",
)
RESUME = click.option("--resume", is_flag=True, help="Continue the run in --out from its latest checkpoint.")


def _run_dir(recipe: str, out: Path | None) -> Path:
    return out or Path("runs") / Path(recipe).stem


@cli.command()
@click.argument("recipe")
@click.argument("overrides", nargs=-1)
@RUN_DIR
@RESUME
def distill(recipe: str, overrides: tuple[str, ...], out: Path | None, resume: bool) -> None:
    """Train a student from RECIPE (a YAML file or a shipped recipe name) with KEY=VALUE overrides."""
    from stillroom.pipeline import train

    student_dir = train(recipe, _run_dir(recipe, out), overrides, resume=resume)
    logging.getLogger("stillroom").info("student saved to %s", student_dir)


@cli.command("run")
@click.argument("recipe")
@click.argument("overrides", nargs=-1)
@RUN_DIR
@RESUME
def run_recipe(recipe: str, overrides: tuple[str, ...], out: Path | None, resume: bool) -> None:
    """Train, export and benchmark RECIPE as its export: and bench: sections say.

    Writes RUN/ (the training run), RUN/artifact and RUN/bench; a re-run skips every stage whose
    result is present and valid.
    """
    from stillroom import pipeline
    from stillroom.serve.commands import log_report

    run_dir = _run_dir(recipe, out)
    result = pipeline.run(pipeline.load_recipe(recipe, overrides), run_dir, resume=resume)
    logging.getLogger("stillroom").info("student %s; artifact %s", result.student, result.artifact_dir)
    log_report(result.report, run_dir / "bench")


@cli.command()
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo-out"),
    show_default=True,
    help="Where runs, artifacts and the report go (re-runs reuse finished stages).",
)
@click.option(
    "--fast", is_flag=True, help="A ~2-minute smoke variant with tiny sizes (numbers not meaningful)."
)
def demo(out: Path, fast: bool) -> None:
    """Distill, export and benchmark the embedded MNIST and Shakespeare teachers; write one report."""
    from stillroom.demo import Demo, print_summary

    combined = Demo(out, fast=fast).run()
    print_summary(combined, out)


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the CLI and turns user errors into one line and a non-zero exit."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        get_host().add_commands(cli)
        cli.main(args=argv, prog_name="stillroom", standalone_mode=False)
    except StillroomError as err:
        if debug:
            raise
        click.echo(f"error: {err}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as err:
        command = err.ctx.command_path if err.ctx is not None else "stillroom"
        click.echo(f"error: {' '.join(err.format_message().split())} (see `{command} --help`)", err=True)
        sys.exit(err.exit_code)
    except click.ClickException as err:
        click.echo(f"error: {' '.join(err.format_message().split())}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
