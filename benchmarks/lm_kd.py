"""Compare the LM distillation methods on the embedded defaults against plain next-token training.

The same student (the embedded teacher's width, 2 of its 4 blocks, initialised from teacher blocks
0 and 2) is trained for the same number of steps, batch and learning rate on the embedded Shakespeare
corpus, once with cross-entropy only (``kd`` with ``kd_ratio: 0``, the baseline) and once per method
(the shipped ``lm-*`` recipes). Printed: held-out perplexity (valid.txt, whole plays never trained
on), next-token top-1 agreement with the teacher, seconds per step, and the change in perplexity
relative to the baseline.

    OMP_NUM_THREADS=1 nice python benchmarks/lm_kd.py        # 8 methods, 40 steps: ~10 min on a busy core
    python benchmarks/lm_kd.py --steps 400 --batch 16 --methods ce,kd,rkl,jsd,sfkl,srkl,tvd,taid --device cuda

Runs are written under ``--out`` (default a temporary directory); results also go to ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# method label -> (named recipe, overrides); every run also gets the shared overrides below
METHODS: dict[str, tuple[str, list[str]]] = {
    "ce (baseline)": ("lm-kd", ["method.kd_ratio=0"]),
    "kd fkl": ("lm-kd", []),
    "kd rkl": ("lm-kd", ["method.divergence=rkl"]),
    "kd jsd": ("lm-kd", ["method.divergence=jsd"]),
    "kd sfkl": ("lm-kd", ["method.divergence=sfkl"]),
    "kd srkl": ("lm-kd", ["method.divergence=srkl"]),
    "kd tvd": ("lm-kd", ["method.divergence=tvd"]),
    # the cache is one teacher pass over the training blocks: here the first 40 * 8 blocks, so that pass
    # fits the benchmark's budget (the student sees as many blocks as the others, each once)
    "kd top-32 cache": ("lm-kd-cache", ["data.max_train_tokens=40960"]),
    "taid": ("lm-taid", []),
    "sinkhorn": ("lm-sinkhorn", []),
    "gkd": ("lm-gkd", []),
    "seqkd": ("lm-seqkd", ["method.max_prompts=128"]),
    "hidden": ("lm-hidden", []),
    "hidden mi_alpha": ("lm-hidden", ["method.hidden_loss=mi_alpha"]),
    "lm_had": ("lm-had", []),
}
SHORT = {
    "ce": "ce (baseline)",
    "kd": "kd fkl",
    "rkl": "kd rkl",
    "jsd": "kd jsd",
    "sfkl": "kd sfkl",
    "srkl": "kd srkl",
    "tvd": "kd tvd",
    "cache": "kd top-32 cache",
    "taid": "taid",
    "sinkhorn": "sinkhorn",
    "gkd": "gkd",
    "seqkd": "seqkd",
    "hidden": "hidden",
    "mi_alpha": "hidden mi_alpha",
    "lm_had": "lm_had",
}


def run(label: str, recipe_name: str, overrides: list[str], args, out: Path) -> dict:
    from stillroom.core import recipe as recipes
    from stillroom.core.trainer import Trainer, iter_metrics

    shared = [
        f"train.steps={args.steps}",
        f"train.batch_size={args.batch}",
        f"train.lr={args.lr}",
        f"data.seq_len={args.seq_len}",
        f"data.eval_tokens={args.eval_tokens}",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "train.tensorboard=false",
        f"train.device={args.device}",
        f"train.seed={args.seed}",
        "train.log_every=1",
    ]
    rec = recipes.load(recipe_name, [*overrides, *shared])
    run_dir = out / label.replace(" ", "_").replace("(", "").replace(")", "")
    started = time.perf_counter()
    Trainer(rec, run_dir).fit()
    wall = time.perf_counter() - started
    rows = list(iter_metrics(run_dir))
    step_times = [r["step_time_s"] for r in rows if "step_time_s" in r][1:]
    final = json.loads((run_dir / "run.json").read_text())["final_eval"]
    return {
        "method": label,
        "perplexity": final["perplexity"],
        "agreement": final["top1_agreement"],
        "s_per_step": statistics.mean(step_times),
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--methods",
        default="ce,kd,taid,sinkhorn,gkd,seqkd,hidden,cache",
        help=f"comma-separated, from: {','.join(SHORT)}",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    out = args.out or Path(tempfile.mkdtemp(prefix="lm_kd_"))
    labels = [SHORT[m.strip()] for m in args.methods.split(",") if m.strip()]
    if "ce (baseline)" not in labels:
        labels.insert(0, "ce (baseline)")
    results = []
    for label in labels:
        recipe_name, overrides = METHODS[label]
        results.append(run(label, recipe_name, overrides, args, out))
        r = results[-1]
        print(
            f"# {label}: ppl {r['perplexity']:.3f} agreement {r['agreement']:.4f} "
            f"{r['s_per_step']:.3f} s/step ({r['wall_s']:.0f} s)",
            flush=True,
        )
    base = results[0]["perplexity"]
    print(
        f"\nembedded teacher -> 2-layer student, {args.steps} steps x {args.batch} x {args.seq_len} tokens, "
        f"lr {args.lr}, device {args.device}, {args.threads} thread(s)\n"
    )
    print("| method | held-out ppl | vs CE | top-1 agreement | s/step |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        change = 100 * (r["perplexity"] / base - 1)
        print(
            f"| {r['method']} | {r['perplexity']:.3f} | {change:+.1f}% | {r['agreement']:.4f} | "
            f"{r['s_per_step']:.3f} |"
        )
    best = min(results[1:], key=lambda r: r["perplexity"], default=None)
    if best is not None:
        change = 100 * (best["perplexity"] / base - 1)
        print(f"\nbest: {best['method']}, perplexity {change:+.1f}% against CE only")
    (out / "results.json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2)
    )
    print(f"runs and results.json in {out}")


if __name__ == "__main__":
    main()
