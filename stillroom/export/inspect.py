"""``stillroom inspect ARTIFACT``: what an exported artifact holds, read from its manifest.

The summary is built from the manifest alone, section by section as the manifest has them (the
family's typed ``spec``: a sampler, an LM's geometry; the facts the exporter put under ``extra``),
so a new family's artifacts show up without this module naming any family. Sizes come from the
manifest's ``files`` entries, which ``artifact.load`` has checked against the disk unless
``--no-verify`` skips the hashing. ``brief`` is the short form of the same overview that
``stillroom export`` ends with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

EXTERNAL_DATA = ".data"  # a graph's external weights sit beside it as GRAPH.data (core.onnx_export)
# validation figures worth a line after an export (besides max_abs_diff against its tolerance)
KEY_FIGURES = ("greedy_agreement", "perplexity_rel_delta", "psnr_db", "min_psnr_db")


def summarize(art: Any) -> dict[str, Any]:
    """The computed figures ``--json`` adds to the manifest: family, total and per-graph bytes."""
    from stillroom.core.errors import StillroomError
    from stillroom.core.host import get_host

    manifest = art.manifest
    sizes = {entry.path: entry.bytes for entry in manifest.files}
    try:
        family = get_host().family_of_kind(manifest.kind).name
    except StillroomError:  # inspecting is how one finds out which plugin an artifact needs
        family = None
    return {
        "path": str(art.root),
        "family": family,
        "files_count": len(manifest.files),
        "files_bytes": sum(sizes.values()),
        "graph_bytes": {
            name: sizes.get(rel, 0) + sizes.get(rel + EXTERNAL_DATA, 0)
            for name, rel in manifest.graphs.items()
        },
    }


def _size(n: int) -> str:
    """Bytes a reader can compare at a glance, with the exact count that ``--json`` and the manifest give."""
    if n < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            break
        value /= 1024
    return f"{value:.1f} {unit} ({n:,} B)"


def _value(value: Any) -> str:
    """One cell: floats to 4 significant digits, containers as compact JSON, None as a dash; escaped,
    since manifest text such as a shape's ``[batch_size, ...]`` would otherwise read as rich markup."""
    from rich.markup import escape

    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return escape(json.dumps(value, separators=(", ", ": ")))
    return escape(str(value))


def _pairs(title: str, rows: list[tuple[str, str]]):
    """A key/value table; keys come from the manifest, values are markup already escaped by ``_value``."""
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_header=False, box=None, padding=(0, 2, 0, 0))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for key, text in rows:
        table.add_row(_value(key), text)
    return table


def _tensors(title: str, specs: list[Any]):
    from rich.table import Table

    table = Table("name", "dtype", "shape", title=title, title_justify="left")
    for spec in specs:
        table.add_row(
            _value(spec.name), _value(spec.dtype), _value("[" + ", ".join(map(str, spec.shape)) + "]")
        )
    return table


def _validation_rows(validation: dict[str, Any]) -> list[tuple[str, str]]:
    """``passed`` first, then the scalar figures; per-sample lists and nested reports are for --json,
    except the names of the stages that were validated (fp32, then fp16 / int8 when exported)."""
    passed = validation.get("passed")
    rows = [("passed", "[green]yes" if passed else "[red]no" if passed is not None else "—")]
    for key, value in validation.items():
        if key == "stages" and isinstance(value, dict):
            rows.append((key, _value(", ".join(value))))
        elif key != "passed" and not isinstance(value, (list, dict)):
            rows.append((key, _value(value)))
    return rows


def _overview(art: Any, summary: dict[str, Any]) -> list[tuple[str, str]]:
    m = art.manifest
    family = _value(summary["family"]) if summary["family"] else "[yellow]no installed family reads it"
    return [
        ("task", _value(m.task or None)),
        ("kind", _value(m.kind)),
        ("family", family),
        ("format", _value(m.format)),
        ("exporter", _value(m.exporter or None)),
        ("precision", _value(m.precision)),
        ("variant", _value(m.variant or None)),
        ("tokenizer", _value(m.tokenizer)),
        ("teacher", _value(m.teacher)),
        ("files", f"{summary['files_count']}, {_size(summary['files_bytes'])}"),
    ]


def _panel(art: Any, rows: list[tuple[str, str]]):
    from rich.panel import Panel

    title = f"artifact {_value(str(art.root))}"
    return Panel(_pairs("", rows), title=title, title_align="left", expand=False)


def _key_figures(validation: dict[str, Any]) -> list[tuple[str, str]]:
    """The few validation figures that say how close the artifact is to its source, then the verdict;
    a figure the exporter did not measure is left out, so every family's validation fits."""
    rows = []
    if "max_abs_diff" in validation:
        tolerance = validation.get("tolerance")
        bound = f" (tolerance {_value(tolerance)})" if tolerance is not None else ""
        rows.append(("max_abs_diff", _value(validation["max_abs_diff"]) + bound))
    rows += [(key, _value(validation[key])) for key in KEY_FIGURES if key in validation]
    passed = validation.get("passed")
    rows.append(("validation", "[green]PASSED" if passed else "[red]FAILED" if passed is not None else "—"))
    return rows


def brief(art: Any):
    """What ``stillroom export`` ends with: the overview ``stillroom inspect`` opens with and the key
    validation figures, rounded, instead of every figure the exporter logged on the way."""
    rows = _overview(art, summarize(art))
    if art.manifest.validation:
        rows += _key_figures(art.manifest.validation)
    return _panel(art, rows)


def stdout_console():
    """The console summaries print to; a pipe or a log gets 120 columns so long tensor names, shapes
    and paths stay on one line."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=120)


def render(art: Any, summary: dict[str, Any], verified: bool) -> list[Any]:
    """The rich renderables of the summary, in reading order; sections the manifest lacks are left out."""
    m = art.manifest
    overview = _overview(art, summary)
    overview.append(("sha256", "verified" if verified else "[yellow]not checked (--no-verify)"))
    parts: list[Any] = [_panel(art, overview)]
    if m.graphs:
        from rich.table import Table

        graphs = Table("graph", "file", "size", title="graphs", title_justify="left")
        for name, rel in m.graphs.items():
            graphs.add_row(_value(name), _value(rel), _size(summary["graph_bytes"][name]))
        parts.append(graphs)
    parts += [
        _tensors(title, specs) for title, specs in (("inputs", m.inputs), ("outputs", m.outputs)) if specs
    ]
    if m.spec:
        parts.append(_pairs("spec", [(k, _value(v)) for k, v in m.spec.items()]))
    nested = {k: v for k, v in m.extra.items() if isinstance(v, dict)}
    for key, section in nested.items():  # e.g. onnxruntime-genai's verdict under extra["genai"]
        parts.append(_pairs(key, [(k, _value(v)) for k, v in section.items()]))
    flat = [(k, _value(v)) for k, v in m.extra.items() if k not in nested]
    if flat:
        parts.append(_pairs("extra", flat))
    if m.validation:
        parts.append(_pairs("validation", _validation_rows(m.validation)))
    origin = m.provenance.model_dump()
    nested_origin = {k: origin.pop(k) for k in ("source", "versions")}
    rows = [(k, _value(v)) for k, v in origin.items()]
    rows += [(f"{k}.{key}", _value(v)) for k, section in nested_origin.items() for key, v in section.items()]
    parts.append(_pairs("provenance", rows))
    return parts


@click.command("inspect")
@click.argument("artifact_dir", metavar="ARTIFACT", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest, sizes and family as JSON.")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of every file (fast on big graphs).")
def inspect_artifact(artifact_dir: Path, as_json: bool, no_verify: bool) -> None:
    """Summarize an exported ARTIFACT: graphs, inputs and outputs, validation, provenance, sizes."""
    from stillroom.core import artifact
    from stillroom.core.host import get_host

    family = get_host().output_family(artifact_dir)
    if family is not None:  # an output that is not a model (a dataset) describes itself
        facts = family.describe(artifact_dir)
        if as_json:
            click.echo(json.dumps(facts, indent=2))
        else:
            rows = [(k, _value(v)) for k, v in facts.items()]
            stdout_console().print(_pairs(f"{family.name} {facts.get('kind', '')}", rows))
        return
    art = artifact.load(artifact_dir, verify=not no_verify)
    summary = summarize(art)
    if as_json:
        click.echo(json.dumps({**summary, "manifest": art.manifest.model_dump(mode="json")}, indent=2))
        return
    console = stdout_console()
    for part in render(art, summary, verified=not no_verify):
        console.print(part)
        console.print()
