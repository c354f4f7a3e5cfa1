"""Does the DisWOT score of a random-init student predict its perplexity after distillation? And does
the student it picks beat the recipe's hand-picked student at the same measured latency?

Every candidate of ``stillroom search-student``'s grid around ``lm-kd``'s student (embedded teacher:
4 x 256, 4 heads; student 2 x 256) is exported to ONNX with the recipe's export options and timed
on ONNX Runtime (batch 1, median generation latency); the limit is the default student's own
measured latency. ``--n`` candidates within the limit, spread over the DisWOT ranking (the best and
the default always in), are then distilled with the same tiny budget (random init for every shape,
so only the architecture differs) and scored on held-out perplexity. Printed and written to
``--out``: each candidate's latency, DisWOT score and perplexity, the Spearman rank correlation
(scipy) between score and perplexity (negative = a higher score predicts a lower perplexity), and
the picked student against the default (also with the recipe's teacher-layers init).

    OMP_NUM_THREADS=1 nice python benchmarks/student_search.py     # ~20 min on a busy 2-core machine
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def spread(rows: list[dict], n: int, must: set[str]) -> list[dict]:
    """``n`` rows evenly spaced over the ranking, always including the names in ``must``."""
    if len(rows) <= n:
        return rows
    picked = {round(i * (len(rows) - 1) / (n - 1)) for i in range(n)}
    names = {rows[i]["name"] for i in picked} | must
    return [r for r in rows if r["name"] in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="lm-kd")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--n", type=int, default=10, help="candidates distilled")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "student_search")
    parser.add_argument(
        "--work", type=Path, default=None, help="runs and latency cache (default: a temp dir)"
    )
    args = parser.parse_args()

    import torch
    from scipy.stats import spearmanr

    from stillroom.core import recipe as recipes
    from stillroom.core.fsio import write_json, write_text
    from stillroom.plugins.lm.student_search import report, search
    from stillroom.plugins.lm.student_search.candidates import grid
    from stillroom.plugins.lm.student_search.latency import Timing

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    work = args.work or Path(tempfile.mkdtemp(prefix="student_search_"))
    shared = [
        f"train.steps={args.steps}",
        f"train.batch_size={args.batch}",
        f"data.seq_len={args.seq_len}",
        f"data.eval_tokens={args.eval_tokens}",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "train.tensorboard=false",
        "train.device=cpu",
        f"train.seed={args.seed}",
    ]
    base = recipes.load(args.recipe, shared)
    started = time.perf_counter()
    s = search.setup(base, work, args.seed, probe_batch=8, probe_len=64)
    shapes = sorted({*grid(s.default, s.teacher_shape), s.default})
    timing = Timing(threads=args.threads)
    timed, refused = search.latencies(s, shapes, timing)
    shapes = list(timed)
    scores = search.diswot_scores(s, shapes)
    limit = timed[s.default]["latency_ms"]
    rows = search.rank(shapes, timed, scores, limit, s.default)
    kept = [r for r in rows if r["kept"]]
    searched_s = time.perf_counter() - started
    print(f"# {len(shapes)} candidates, {len(kept)} within {limit:.2f} ms ({searched_s:.0f} s)", flush=True)

    by_name = {c.name: c for c in shapes}
    chosen = spread(kept, args.n, {kept[0]["name"], s.default.name})
    for row in chosen:
        data = {**base.to_dict(), **s.student_overrides(by_name[row["name"]])}
        data["student"]["init"] = "random"
        t0 = time.perf_counter()
        final = search.distil(recipes.validate(data), work / "runs" / row["name"])
        row.update(perplexity=final["perplexity"], top1_agreement=final["top1_agreement"])
        row["train_s"] = round(time.perf_counter() - t0, 1)
        print(
            f"# {row['name']}: {row['latency_ms']:.2f} ms, DisWOT {row['score']:.4f}, "
            f"ppl {row['perplexity']:.3f}",
            flush=True,
        )
    rho, p = spearmanr([r["score"] for r in chosen], [r["perplexity"] for r in chosen])
    default_recipe = search.distil(base, work / "runs" / "default-teacher-layers")
    picked = next(r for r in chosen if r["name"] == kept[0]["name"])
    default = next(r for r in chosen if r["name"] == s.default.name)
    result = {
        "recipe": args.recipe,
        "budget": {"steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "init": "random"},
        "timing": timing.__dict__,
        "strategy": "diswot",
        "runtime": "onnxruntime",
        "latency_limit_ms": limit,
        "kept": len(kept),
        "best": picked["name"],
        "default": s.default.name,
        "spearman_score_vs_perplexity": {"rho": rho, "p": p, "n": len(chosen)},
        "picked_vs_default": {
            "picked": {k: picked[k] for k in ("name", "latency_ms", "score", "perplexity")},
            "default_random_init": {k: default[k] for k in ("name", "latency_ms", "score", "perplexity")},
            "default_teacher_layers_init": default_recipe["perplexity"],
        },
        "distilled_candidates": chosen,
        "candidates": rows,
        "not_exportable": refused,
        "wall_minutes": round((time.perf_counter() - started) / 60, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", result)
    report.write(args.out, result)
    lines = [
        f"# DisWOT on {args.recipe}: {len(chosen)} candidates distilled "
        f"({args.steps} steps x {args.batch} x {args.seq_len}, random init)",
        "",
        "| candidate | params (M) | latency ms | DisWOT | perplexity |",
        "|---|---|---|---|---|",
        *(
            f"| {r['name']}{' (default)' if r['default'] else ''}"
            f"{' (picked)' if r['name'] == picked['name'] else ''} "
            f"| {r['params'] / 1e6:.2f} | {r['latency_ms']:.2f} | {r['score']:.4f} | {r['perplexity']:.3f} |"
            for r in chosen
        ),
        "",
        f"Spearman(DisWOT, perplexity) = {rho:.3f} (p = {p:.3f}, n = {len(chosen)}); "
        "negative = the score predicts lower perplexity.",
        f"Picked {picked['name']} ({picked['latency_ms']:.2f} ms): ppl {picked['perplexity']:.3f}; "
        f"default {default['name']} "
        f"({default['latency_ms']:.2f} ms): ppl {default['perplexity']:.3f} (random init), "
        f"{default_recipe['perplexity']:.3f} (the recipe's teacher-layers init).",
    ]
    write_text(args.out / "summary.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
