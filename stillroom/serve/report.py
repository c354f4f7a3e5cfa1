"""Writing a benchmark report: report.json, report.md and a self-contained report.html.

report.json::

    {"format_version": 1, "kind": <the family's artifact kind>, "machine": {...}, "settings": {...},
     "teacher": {<entry>, "by_batch": [<entry>, ...]} | null,
     "students": [<entry>, ...],            # one per (student, runtime, batch)
     "speedup_p50": float | null}           # best student's teacher_p50 / student_p50 at the smallest batch

    <entry> = {"name", "runtime", "role", "spec", "batch", "latency_ms": {"p50", "p90", "p99", "mean", "min"},
               "throughput", "throughput_unit", "load_s", "peak_rss_mb", "gpu_peak_mb", "provider",
               "quality": {...}, "speedup_p50",                          # students only
               token models: "ttft_ms", "per_token_ms", "continuations": [{"prompt", "text"}],
               image models: "samples": "samples/NAME.png"}  |  {"name", "runtime", "error"}

The report names no family: its quality columns are the ``quality_keys`` of the family of the
report's kind (the first, ``metric``, is plotted against latency; ``Family.higher_is_better`` says
which way is better), and each part
appears when the rows carry its data: time-to-first-token columns, continuations, sample grids.
The HTML embeds its plots (matplotlib, PNG as base64): p50 latency bars with p90 whiskers per batch
size, quality against latency, the sample grids and continuations.
"""

from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path
from typing import Any

import numpy as np

from stillroom.core.fsio import write_bytes, write_json, write_text
from stillroom.core.host import get_host


def _rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    teacher = report.get("teacher")
    return [*((teacher or {}).get("by_batch") or []), *report["students"]]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "model"


def _grid_png(images: np.ndarray, columns: int = 8) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = images.shape[0]
    rows = max(1, -(-n // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 0.9, rows * 0.9))
    for ax, i in zip(np.atleast_1d(axes).ravel(), range(rows * columns), strict=True):
        ax.axis("off")
        if i < n:
            img = (np.clip(images[i], -1, 1) + 1) / 2
            ax.imshow(
                img[0] if img.shape[0] == 1 else np.transpose(img[:3], (1, 2, 0)), cmap="gray", vmin=0, vmax=1
            )
    return _fig_bytes(fig)


def _fig_bytes(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def latency_plot(report: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in _rows(report) if "error" not in r]
    batches = sorted({r["batch"] for r in rows})
    labels = list(dict.fromkeys(f"{r['name']} [{r['runtime']}]" for r in rows))
    fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 3.2), squeeze=False)
    for ax, batch in zip(axes[0], batches, strict=True):
        p50, err = [], []
        for label in labels:
            row = next(
                (r for r in rows if r["batch"] == batch and f"{r['name']} [{r['runtime']}]" == label), None
            )
            p50.append(row["latency_ms"]["p50"] if row else 0.0)
            err.append(row["latency_ms"]["p90"] - row["latency_ms"]["p50"] if row else 0.0)
        ax.bar(
            range(len(labels)),
            p50,
            yerr=[np.zeros(len(err)), err],
            capsize=3,
            color=["#b0b0b0" if lab.startswith("teacher") else "#3b7dd8" for lab in labels],
        )
        ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("latency ms (p50, whisker p90)")
        ax.set_title(f"batch {batch}")
    return _fig_bytes(fig)


def quality_plot(report: dict[str, Any]) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    family = get_host().family_of_kind(report["kind"])
    key = family.metric
    batch = min(report["settings"]["batches"])
    points = [
        r
        for r in _rows(report)
        if "error" not in r and r["batch"] == batch and r["quality"].get(key) is not None
    ]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for r in points:
        ax.scatter(
            r["latency_ms"]["p50"],
            r["quality"][key],
            s=40,
            color="#808080" if r["role"] == "teacher" else "#3b7dd8",
        )
        ax.annotate(
            f"{r['name']} [{r['runtime']}]",
            (r["latency_ms"]["p50"], r["quality"][key]),
            fontsize=8,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.set_xscale("log")
    ax.set_xlabel(f"p50 latency ms at batch {batch}")
    ax.set_ylabel(f"{key} ({'higher' if family.higher_is_better else 'lower'} is better)")
    ax.set_title("quality vs latency")
    return _fig_bytes(fig)


def format_value(v: Any, digits: int = 3) -> str:
    """A table cell: "-" for missing, ``digits`` significant digits for floats below 1000."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def markdown(report: dict[str, Any]) -> str:
    kind = report["kind"]
    qkeys = get_host().family_of_kind(kind).quality_keys
    ttft = any("ttft_ms" in r for r in _rows(report))
    head = ["model", "runtime", "batch", "p50 ms", "p90 ms", "p99 ms", "throughput"]
    head += ["TTFT ms", "ms/token"] if ttft else []
    head += ["load s", "peak RSS MB", *qkeys, "speedup p50"]
    lines = [
        f"# stillroom bench: {kind}",
        "",
        f"Machine: {report['machine']['cpu']} ({report['machine']['cpu_count']} CPUs), "
        f"GPU: {report['machine']['gpu'] or 'none'}; torch {report['machine']['torch']}, "
        f"onnxruntime {report['machine']['onnxruntime']}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in _rows(report):
        if "error" in r:
            lines.append(f"| {r['name']} | {r['runtime']} | error: {r['error']} |")
            continue
        lat = r["latency_ms"]
        cells = [
            r["name"] + (" (teacher)" if r["role"] == "teacher" else ""),
            r["runtime"],
            r["batch"],
            format_value(lat["p50"]),
            format_value(lat["p90"]),
            format_value(lat["p99"]),
            f"{format_value(r['throughput'])} {r['throughput_unit']}",
        ]
        if ttft:
            cells += [_p50(r, "ttft_ms"), _p50(r, "per_token_ms")]
        cells += [
            format_value(r.get("load_s")),
            format_value(r.get("peak_rss_mb"), 4),
            *[format_value(r["quality"].get(k)) for k in qkeys],
            format_value(r.get("speedup_p50")),
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += [
        "",
        f"Speedup (teacher p50 / best student p50 at batch {min(report['settings']['batches'])}): "
        f"{format_value(report.get('speedup_p50'))}x",
        "",
    ]
    models = _unique_models(report)
    if any("continuations" in r for r in models):
        lines += ["## Continuations (greedy)", ""]
        for r in models:
            for c in r.get("continuations") or []:
                lines.append(f"- **{r['name']} [{r['runtime']}]** `{c['prompt']}` -> {c['text']!r}")
    if any("samples" in r for r in models):
        lines += ["## Samples", ""] + [f"![{r['name']}]({r['samples']})" for r in models if r.get("samples")]
    return "\n".join(lines) + "\n"


def _p50(row: dict[str, Any], key: str) -> str:
    return format_value((row.get(key) or {}).get("p50"))


def _unique_models(report: dict[str, Any]) -> list[dict[str, Any]]:
    seen, out = set(), []
    for r in _rows(report):
        key = (r["name"], r["runtime"])
        if "error" not in r and key not in seen:
            seen.add(key)
            out.append(r)
    return out


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


PAGE_HEAD = (
    "<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>"
    "body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}"
    "td,th{{border:1px solid #ccc;padding:3px 6px;font-size:13px}}img{{max-width:100%}}</style></head><body>"
)


def html_table(md_table: str) -> str:
    """A markdown pipe table as an HTML table."""
    rows = [line for line in md_table.splitlines() if line.startswith("|")]
    parts = ["<table>"]
    for i, line in enumerate(rows):
        if i == 1:
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        tag = "th" if i == 0 else "td"
        parts.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>")
    parts.append("</table>")
    return "\n".join(parts) if rows else ""


def html_section(report: dict[str, Any], md_table: str, grids: dict[str, bytes], level: int = 1) -> str:
    """One report's tables, plots, samples/continuations, as HTML (no page wrapper)."""
    h, h2 = f"h{level}", f"h{level + 1}"
    parts = [f"<{h}>stillroom bench: {html.escape(report['kind'])}</{h}>", html_table(md_table)]
    parts.append(f"<p>Speedup p50: {html.escape(format_value(report.get('speedup_p50')))}x</p>")
    parts += [f"<{h2}>Latency</{h2}>", _img(latency_plot(report), "latency")]
    qp = quality_plot(report)
    if qp:
        parts += [f"<{h2}>Quality vs latency</{h2}>", _img(qp, "quality vs latency")]
    models = _unique_models(report)
    if any("continuations" in r for r in models):
        parts.append(
            f"<{h2}>Continuations</{h2}><table><tr><th>model</th><th>prompt</th><th>continuation</th></tr>"
        )
        for r in models:
            for c in r.get("continuations") or []:
                parts.append(
                    f"<tr><td>{html.escape(r['name'])} [{html.escape(r['runtime'])}]</td>"
                    f"<td>{html.escape(c['prompt'])}</td><td>{html.escape(c['text'])}</td></tr>"
                )
        parts.append("</table>")
    if grids or any("samples" in r for r in models):
        parts.append(f"<{h2}>Samples</{h2}>")
        for label, png in grids.items():
            parts += [f"<h{level + 2}>{html.escape(label)}</h{level + 2}>", _img(png, label)]
    return "\n".join(parts)


def html_page(report: dict[str, Any], md_table: str, grids: dict[str, bytes]) -> str:
    return "\n".join(
        [
            PAGE_HEAD.format(title="stillroom bench"),
            html_section(report, md_table, grids),
            "<h2>Machine</h2><pre>" + html.escape(_pretty(report["machine"])) + "</pre></body></html>",
        ]
    )


def _pretty(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=2)


def write_report(report: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """Writes report.json, report.md, report.html (+ samples/*.png) into ``out``; returns their paths."""
    out = Path(out)
    grids: dict[str, bytes] = {}
    for r in [*_rows(report), *([report["teacher"]] if report.get("teacher") else [])]:
        grid = (r.pop("arrays", None) or {}).get("grid")
        if grid and "error" not in r:
            label = f"{r['name']} [{r['runtime']}]"
            if label not in grids:
                grids[label] = _grid_png(np.load(grid))
                write_bytes(out / "samples" / f"{_slug(label)}.png", grids[label])
            r["samples"] = f"samples/{_slug(label)}.png"
    md = markdown(report)
    write_json(out / "report.json", report)
    write_text(out / "report.md", md)
    write_text(out / "report.html", html_page(report, md, grids))
    return {"json": out / "report.json", "md": out / "report.md", "html": out / "report.html"}
