"""Multi-round self-distillation with ground-truth guidance on unseen plays (Borup & Andersen 2021,
"Even your Teacher Needs Guidance"; Lee et al. 2023, "Self-Distillation for Further Pre-training").

The domain is the shipped ``lm-self-distill`` recipe's: the embedded LM (theta_0) meets Julius Caesar
and The Tempest, which it never saw; training reads the head of those plays, perplexity the tail.

- round 0, further pre-training: theta_0 trained on CE alone (``kd`` with ``kd_ratio: 0``) -> M_0, the
  plain baseline;
- round k >= 1, for each ground-truth weight xi: a student restarted from theta_0 learns from
  M_{k-1}^xi (M_0 for k = 1) with loss (1 - xi) * distillation + xi * CE -> M_k^xi. Distillation is
  ``kd``'s forward KL on the logits (Borup & Andersen distil outputs) or ``self_distill``'s
  last-hidden-state MSE (Lee et al.), chosen by ``--methods``.

Every round is an ordinary run of the trainer (fresh optimizer and schedule, same steps, batch, seed
and lr), chained by ``teacher.path=PREVIOUS/student``; the script prints and writes held-out perplexity
per round and xi (``results.json``, ``results.md`` in ``--results``). Runs already complete in ``--out``
are read back, not repeated (their ``wall_s`` is then the sum of their step times), so an interrupted
benchmark continues and two ``--methods`` can run in parallel processes on one ``--out``.

    OMP_NUM_THREADS=1 nice python benchmarks/self_distill_rounds.py          # ~30 min on a busy core
    python benchmarks/self_distill_rounds.py --steps 200 --batch 16 --device cuda
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

RECIPE = "lm-self-distill"
THETA_0 = "embedded:lm_teacher"


def distill_method(method: str, xi: float, hidden_weight: float) -> str:
    if method == "kd":
        return f"method={{name: kd, divergence: fkl, kd_ratio: {1 - xi}}}"
    return (
        f"method={{name: self_distill, further_steps: 0, kd_ratio: {1 - xi}, hidden_weight: {hidden_weight}}}"
    )


def initial_perplexity(args) -> float:
    """theta_0 on the held-out tail, read through the method's own held-out split."""
    import torch

    from stillroom.core import recipe as recipes
    from stillroom.core.method import Context
    from stillroom.plugins.lm import models
    from stillroom.plugins.lm.base import LMMethod
    from stillroom.plugins.lm.metrics import evaluate_lm

    rec = recipes.load(RECIPE, [f"data.seq_len={args.seq_len}", f"data.eval_tokens={args.eval_tokens}"])
    method = LMMethod(rec, Context(torch.device(args.device), torch.float32, Path()))
    model, method.tokenizer = models.load_causal_lm(THETA_0)
    return evaluate_lm(model.eval().to(args.device), method.heldout().to(args.device), 8)["perplexity"]


def run_once(label: str, overrides: list[str], args) -> dict:
    """A round's run, or the one already in ``--out`` (an interrupted benchmark continues)."""
    from lm_kd import run

    from stillroom.core.trainer import iter_metrics

    run_dir = args.out / label
    if not (run_dir / "run.json").is_file():
        return run(label, RECIPE, overrides, args, args.out)
    final = json.loads((run_dir / "run.json").read_text())["final_eval"]
    steps = sum(r.get("step_time_s", 0.0) for r in iter_metrics(run_dir))
    return {"perplexity": final["perplexity"], "wall_s": steps}


def main() -> None:
    from stillroom.core.fsio import write_json, write_text

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gt-weights", default="0,0.3,0.6", help="xi values, comma-separated")
    parser.add_argument("--methods", default="kd,self_distill")
    parser.add_argument("--hidden-weight", type=float, default=256.0, help="self_distill: D * lambda")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True, help="run folders")
    parser.add_argument(
        "--results", type=Path, default=REPO / "benchmarks" / "results" / "self_distill_rounds"
    )
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    base = [f"student.path={THETA_0}", "train.warmup_steps=5"]
    rows = [
        {"method": "-", "xi": None, "round": "theta_0", "perplexity": initial_perplexity(args), "wall_s": 0.0}
    ]
    print(f"# theta_0: ppl {rows[0]['perplexity']:.3f}", flush=True)
    r0 = run_once("r0_further_pretraining", [*base, "method={name: kd, kd_ratio: 0.0}"], args)
    rows.append(
        {"method": "ce", "xi": 1.0, "round": 0, "perplexity": r0["perplexity"], "wall_s": r0["wall_s"]}
    )
    print(f"# round 0 (further pre-training): ppl {r0['perplexity']:.3f}", flush=True)
    for method in args.methods.split(","):
        for xi in [float(x) for x in args.gt_weights.split(",")]:
            teacher = args.out / "r0_further_pretraining" / "student"
            for k in range(1, args.rounds + 1):
                label = f"{method}_xi{xi}_r{k}"
                overrides = [*base, f"teacher.path={teacher}", distill_method(method, xi, args.hidden_weight)]
                r = run_once(label, overrides, args)
                rows.append(
                    {
                        "method": method,
                        "xi": xi,
                        "round": k,
                        **{key: r[key] for key in ("perplexity", "wall_s")},
                    }
                )
                print(f"# {label}: ppl {r['perplexity']:.3f} ({r['wall_s']:.0f} s)", flush=True)
                teacher = args.out / label / "student"

    table = markdown(rows, args)
    print("\n" + table)
    minutes = (time.perf_counter() - started) / 60
    training = sum(r["wall_s"] for r in rows) / 60
    args.results.mkdir(parents=True, exist_ok=True)
    write_json(
        args.results / "results.json",
        {
            "args": {k: str(v) for k, v in vars(args).items()},
            "wall_minutes": minutes,
            "training_minutes": training,
            "rows": rows,
        },
    )
    footer = f"\ntraining time {training:.1f} min summed over the runs, {args.threads} thread(s)\n"
    write_text(args.results / "results.md", table + footer)


def markdown(rows: list[dict], args) -> str:
    """One line per (method, xi): perplexity at each round, round 0 = further pre-training."""
    init, r0 = rows[0]["perplexity"], rows[1]["perplexity"]
    head = (
        f"held-out perplexity on unseen plays (tail), {args.steps} steps x {args.batch} x "
        f"{args.seq_len} tokens per round, lr {args.lr}, device {args.device}\n\n"
        f"theta_0 (no training): {init:.3f}; round 0, further pre-training (CE only): {r0:.3f}\n\n"
    )
    ks = sorted({r["round"] for r in rows if isinstance(r["round"], int) and r["round"] > 0})
    lines = [
        "| distillation | xi (gt weight) | " + " | ".join(f"round {k}" for k in ks) + " |",
        "|---|---:|" + "---:|" * len(ks),
    ]
    for method in dict.fromkeys(r["method"] for r in rows if r["round"] not in ("theta_0", 0)):
        for xi in dict.fromkeys(r["xi"] for r in rows if r["method"] == method):
            ppl = {r["round"]: r["perplexity"] for r in rows if r["method"] == method and r["xi"] == xi}
            lines.append(f"| {method} | {xi} | " + " | ".join(f"{ppl[k]:.3f}" for k in ks if k in ppl) + " |")
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
