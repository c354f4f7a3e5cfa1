"""The search's report: leaderboard JSON and Markdown, and a plot of score against measured latency."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stillroom.core.fsio import write_bytes, write_json, write_text


def write(out: Path, result: dict[str, Any]) -> None:
    """OUT/leaderboard.json, OUT/leaderboard.md and OUT/latency_score.png."""
    write_json(out / "leaderboard.json", result)
    write_text(out / "leaderboard.md", markdown(result))
    write_bytes(out / "latency_score.png", plot(result))


def markdown(result: dict[str, Any]) -> str:
    head = ["rank", "candidate", "params (M)", "latency ms", "score", "kept", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["candidates"]:
        note = ", ".join(
            n for n, on in (("default", r["default"]), ("picked", r["name"] == result["best"])) if on
        )
        cells = [
            str(r.get("rank", "-")),
            r["name"],
            f"{r['params'] / 1e6:.2f}",
            f"{r['latency_ms']:.2f}",
            f"{r['score']:.4f}",
            "yes" if r["kept"] else "over limit",
            note,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    title = (
        f"# search-student ({result['strategy']}): {result['kept']} of {len(result['candidates'])} "
        f"candidates within {result['latency_limit_ms']} ms on {result['runtime']}\n\n"
    )
    trained = "".join(f"\n- {k}: {v}" for k, v in (result.get("distilled") or {}).items())
    refused = "".join(f"\n- {k}: {v}" for k, v in (result.get("not_exportable") or {}).items())
    return (
        title
        + "\n".join(lines)
        + ("\n\nDistilled:" + trained if trained else "")
        + ("\n\nNot exportable (dropped):" + refused if refused else "")
        + "\n"
    )


def plot(result: dict[str, Any]) -> bytes:
    """PNG bytes: every candidate's score against its measured latency."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["candidates"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for kept, colour, label in ((True, "tab:blue", "within limit"), (False, "tab:gray", "over limit")):
        pick = [r for r in rows if r["kept"] is kept]
        ax.scatter([r["latency_ms"] for r in pick], [r["score"] for r in pick], c=colour, s=18, label=label)
    for key, marker, label in (("default", "s", "recipe's student"), ("picked", "*", "picked")):
        pick = [r for r in rows if (r["default"] if key == "default" else r["name"] == result["best"])]
        ax.scatter(
            [r["latency_ms"] for r in pick],
            [r["score"] for r in pick],
            marker=marker,
            s=120,
            facecolors="none",
            edgecolors="tab:red",
            label=label,
        )
    ax.axvline(result["latency_limit_ms"], color="tab:red", lw=0.8, ls="--")
    ax.set_xlabel(f"measured latency, ms ({result['runtime']}, batch 1)")
    ax.set_ylabel(f"{result['strategy']} score (higher is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
