"""Dataset distillation on the embedded MNIST: every method at IPC 1, 10, 50 through `stillroom run`.

Each row is the shipped recipe ``mnist-dd-<method>-ipc<N>`` run into ``--work/<method>-ipc<N>`` (a
re-run skips finished runs, and the evaluation cache under $STILLROOM_CACHE skips finished networks),
then benched: fresh ConvNet-3s trained on the distilled set, on the full 4000-image train split and on
a random real subset at the same IPC, accuracy on the 1000 held-out images (mean +- std over seeds).
``--set KEY=VALUE`` overrides every recipe, ``METHOD:KEY=VALUE`` only that method's (e.g. a smaller
evaluation protocol on a loaded machine);
the overrides used are printed with the table. Writes ``results.json``, ``table.md`` and
``accuracy_vs_ipc.png`` (accuracy vs IPC per method, random and full-data lines) into ``--out``; rows
already in ``--out/results.json`` are kept (a re-run of a (method, IPC) replaces its row), so the table
can be filled in several calls, e.g. one method last:

    OMP_NUM_THREADS=1 python benchmarks/dataset_distill.py --ipc 1 10 \\
        --methods mtt rethink_pca ftd datm shq cvdd
    OMP_NUM_THREADS=1 python benchmarks/dataset_distill.py --ipc 1 10 --methods ssl_dd
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from stillroom import pipeline
from stillroom.core.fsio import write_bytes, write_json, write_text

METHODS = [
    "mtt",
    "rethink_pca",
    "ftd",
    "datm",
    "shq",
    "cvdd",
    "ssl_dd",
]  # a new method: one line (and its recipes mnist-dd-<method>-ipc{1,10,50}.yaml)
IPCS = [1, 10, 50]
OUT = Path(__file__).resolve().parent / "results" / "dataset_distill"


def run_one(method: str, ipc: int, work: Path, overrides: list[str]) -> dict:
    started = time.perf_counter()
    mine = [
        o.split(":", 1)[-1] for o in overrides if ":" not in o.split("=")[0] or o.startswith(f"{method}:")
    ]
    recipe = pipeline.load_recipe(f"mnist-dd-{method}-ipc{ipc}", mine)
    result = pipeline.run(recipe, work / f"{method}-ipc{ipc}")
    card = json.loads((result.student / "card.json").read_text(encoding="utf-8"))
    rows = result.report["rows"]
    return {
        "method": method,
        "ipc": ipc,
        **{f"{name}_accuracy": rows[name]["accuracy"] for name in rows},
        **{f"{name}_std": rows[name]["accuracy_std"] for name in rows},
        "distill_cpu_minutes": card["cpu_minutes"],
        "expert_cpu_minutes": card.get("expert_cpu_minutes", 0.0),
        "eval_cpu_minutes": round(sum(r["cpu_s"] for r in rows.values()) / 60, 3),
        "wall_minutes_this_call": round((time.perf_counter() - started) / 60, 2),
        "protocol": result.report["protocol"],
        "overrides": mine,
    }


def table(rows: list[dict]) -> str:
    p = rows[0]["protocol"]
    overrides = sorted({o for r in rows for o in r.get("overrides", [])})
    lines = [
        f"protocol: ConvNet-{p['depth']} width {p['width']}, DSA '{p['augment']}', {p['seeds']} seeds, "
        f"{p['epochs']} epochs ({p['full_epochs']} on the full split), lr {p['lr']}",
        f"overrides: {' '.join(overrides) or '(none: the shipped recipes)'}",
        "",
        "| method | IPC | distilled % | random % | full % | distill CPU min | experts CPU min "
        "| eval CPU min |",
        "|---|---|---|---|---|---|---|---|",
    ]
    pct = lambda r, k: f"{100 * r[k + '_accuracy']:.2f} +- {100 * r[k + '_std']:.2f}"  # noqa: E731
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['ipc']} | {pct(r, 'distilled')} | {pct(r, 'random')} | {pct(r, 'full')} "
            f"| {r['distill_cpu_minutes']:.2f} | {r['expert_cpu_minutes']:.2f} "
            f"| {r['eval_cpu_minutes']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["ipc"])
        ax.errorbar([r["ipc"] for r in mine], [100 * r["distilled_accuracy"] for r in mine],
                    yerr=[100 * r["distilled_std"] for r in mine], marker="o", label=method)  # fmt: skip
    random = {r["ipc"]: r for r in rows}
    ipcs = sorted(random)
    ax.plot(ipcs, [100 * random[i]["random_accuracy"] for i in ipcs], "k--", label="random real")
    ax.axhline(100 * rows[0]["full_accuracy"], color="grey", label="full train split (4000)")
    ax.set(
        xscale="log",
        xlabel="images per class",
        ylabel="held-out accuracy %",
        title=f"MNIST, ConvNet-3 (width {rows[0]['protocol']['width']})",
    )
    ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    write_bytes(path, buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--ipc", nargs="+", type=int, default=IPCS)
    parser.add_argument("--set", nargs="*", default=[], help="KEY=VALUE overrides for every recipe")
    parser.add_argument("--work", type=Path, default=Path("runs/dataset_distill"))
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    rows = previous(args.out / "results.json")
    for ipc in args.ipc:
        for method in args.methods:
            row = run_one(method, ipc, args.work, args.set)
            if rows and row["protocol"] != rows[0]["protocol"]:
                raise SystemExit(
                    f"{method} IPC {ipc} was evaluated with another protocol than the rows in "
                    f"{args.out}/results.json: use another --out, or delete that file"
                )
            rows = sorted([r for r in rows if (r["method"], r["ipc"]) != (method, ipc)] + [row], key=order)
            write_json(args.out / "results.json", rows)
            write_text(args.out / "table.md", table(rows))
            print(table(rows), flush=True)
    plot(rows, args.out / "accuracy_vs_ipc.png")


def previous(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []


def order(row: dict) -> tuple:
    known = row["method"] in METHODS
    return row["ipc"], METHODS.index(row["method"]) if known else len(METHODS), row["method"]


if __name__ == "__main__":
    main()
