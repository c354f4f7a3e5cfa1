"""MNIST classifier distillation on a shifted pool: all of it vs each data selector at one budget.

The pool stands in for "webly collected" data (KD3's setting): 2000 digits of the embedded MNIST train
split as they are, 2000 more shifted (translated up to 5 px, a quarter of them inverted, Gaussian
noise), and scikit-learn's 1797 8x8 digits resized to 20x20 inside a 28x28 frame (another dataset's
handwriting). The embedded MNIST classifier (468k parameters) teaches the shipped
``mnist-classifier-kd`` student (55k) for the same steps, batch and seed on

- ``full``: the whole pool (5797 examples; no ``data.select``),
- ``random``: ``prune_kd`` with ``score: random`` and no adaptive weight: a uniform subset at the budget,
- ``prune_kd``: EL2N of the teacher, hardest kept, adaptive KD weight alpha(f);
  ``prune_kd_easy``: the same keeping the easiest,
- ``kd3``: dynamic selection every ``--every`` steps, at most the budget; ``kd3_mix``: with
  MixDistribution (half as many again mixed examples, which the teacher also labels),
- ``active``: robust active distillation, the budget in teacher queries, a round every ``--every`` steps,

and scored on the held-out MNIST eval split (1000 digits): top-1 accuracy, agreement with the teacher,
the examples trained on at the end and the teacher queries (pool images the teacher was run on, from
``selection.json``; the full run queries all). CPU minutes are the training process's CPU time.

    .venv/bin/pip install -e '.[bench-selection]'    # scikit-learn, for its 8x8 digits
    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/data_selection.py   # 7 runs: ~3 CPU min

Writes ``results.json`` and ``results.md`` into ``--results`` (default
``benchmarks/results/data_selection``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def shifted_pool(out: Path, seed: int = 0) -> Path:
    """Writes the pool .npz (train: the shifted pool; eval: the MNIST eval split)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from stillroom.plugins.classifier import data

    rng = np.random.default_rng(seed)
    (images, labels), (eval_images, eval_labels) = (
        data.load_split(data.DEFAULT, s) for s in ("train", "eval")
    )
    images, eval_images = images[:, 0], eval_images[:, 0]
    clean, moved = images[:2000], images[2000:4000].copy()
    for i in range(len(moved)):
        moved[i] = np.roll(moved[i], tuple(rng.integers(-5, 6, size=2)), axis=(0, 1))
    moved[: len(moved) // 4] = 255 - moved[: len(moved) // 4]
    moved = np.clip(moved + rng.normal(0, 40, moved.shape), 0, 255).astype(np.uint8)
    digits = load_digits()
    other = np.zeros((len(digits.images), 28, 28), dtype=np.uint8)
    for i, small in enumerate(digits.images):
        big = Image.fromarray((small * 255 / 16).astype(np.uint8)).resize((20, 20), Image.BILINEAR)
        other[i, 4:24, 4:24] = np.asarray(big)
    path = out / "shifted_pool.npz"
    np.savez(
        path,
        train_images=np.concatenate([clean, moved, other]),
        train_labels=np.concatenate([labels[:2000], labels[2000:4000], digits.target]),
        eval_images=eval_images,
        eval_labels=eval_labels,
    )
    return path


def rows(budget: int, pool_size: int, every: int) -> dict[str, list[str]]:
    keep = budget / pool_size
    return {
        "full": [],
        "random": ["data.select.name=prune_kd", f"data.select.keep={keep}", "data.select.adaptive=false"],
        "prune_kd": ["data.select.name=prune_kd", f"data.select.keep={keep}", "data.select.score=el2n"],
        "prune_kd_easy": [
            "data.select.name=prune_kd",
            f"data.select.keep={keep}",
            "data.select.score=el2n",
            "data.select.prefer=easy",
        ],
        "kd3": ["data.select.name=kd3", f"data.select.budget={budget}", f"data.select.every={every}"],
        "kd3_mix": [
            "data.select.name=kd3",
            f"data.select.budget={budget}",
            f"data.select.every={every}",
            "data.select.mix=0.5",
        ],
        "active": ["data.select.name=active", f"data.select.budget={budget}", f"data.select.every={every}"],
    }


def train(label: str, overrides: list[str], pool: Path, pool_size: int, args, out: Path) -> dict:
    from stillroom.core import recipe as recipes
    from stillroom.core.trainer import Trainer

    shared = [
        f"data.source={pool}",
        f"train.steps={args.steps}",
        f"train.batch_size={args.batch}",
        f"train.seed={args.seed}",
        "train.device=cpu",
        "train.eval_every=0",
        "train.tensorboard=false",
    ]
    run_dir = out / label
    cpu, wall = time.process_time(), time.perf_counter()
    rec = recipes.load("mnist-classifier-kd", [*shared, *overrides])
    Trainer(rec, run_dir).fit()
    final = json.loads((run_dir / "run.json").read_text())["final_eval"]
    selection = run_dir / "selection.json"
    chosen = json.loads(selection.read_text()) if selection.is_file() else None
    return {
        "row": label,
        "accuracy": final["accuracy"],
        "top1_agreement": final["top1_agreement"],
        "examples": len(chosen["indices"]) if chosen else pool_size,
        "teacher_queries": chosen["teacher_queries"] if chosen else pool_size,
        "mixed": len(chosen["mixes"][0]) if chosen and chosen["mixes"] else 0,
        "alpha": rec.method.alpha,
        "cpu_min": (time.process_time() - cpu) / 60,
        "wall_s": time.perf_counter() - wall,
    }


def markdown(results: list[dict], args, pool_size: int) -> str:
    lines = [
        f"embedded MNIST classifier -> 16/32-channel CNN student (classifier_kd, T = 4) on a shifted pool of "
        f"{pool_size} (2000 MNIST, 2000 shifted MNIST, 1797 resized scikit-learn digits); budget "
        f"{args.budget} examples, {args.steps} steps x batch {args.batch}, seed {args.seed}, CPU, 1 thread; "
        "held-out MNIST eval split (1000 digits)",
        "",
        "| row | accuracy | top-1 agreement | examples trained on | + mixed | teacher queries (pool) "
        "| KD weight | CPU min |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['row']} | {r['accuracy']:.4f} | {r['top1_agreement']:.4f} | {r['examples']} | "
            f"{r['mixed']} | {r['teacher_queries']} | {r['alpha']:.3f} | {r['cpu_min']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--budget", type=int, default=1000)
    parser.add_argument("--every", type=int, default=250, help="kd3 and active: steps between selections")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", default="full,random,prune_kd,prune_kd_easy,kd3,kd3_mix,active")
    parser.add_argument("--out", type=Path, default=None, help="run directories (default: a temporary one)")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "data_selection")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    out = args.out or Path(tempfile.mkdtemp(prefix="data_selection_"))
    out.mkdir(parents=True, exist_ok=True)
    pool = shifted_pool(out)
    with np.load(pool) as arrays:
        pool_size = len(arrays["train_labels"])
    table = rows(args.budget, pool_size, args.every)
    results = []
    for label in [r.strip() for r in args.rows.split(",") if r.strip()]:
        results.append(train(label, table[label], pool, pool_size, args, out))
        r = results[-1]
        print(
            f"# {label}: accuracy {r['accuracy']:.4f} ({r['examples']} examples, {r['cpu_min']:.2f} CPU min)"
        )
    text = markdown(results, args, pool_size)
    print("\n" + text)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "results.md").write_text(text)
    payload = {"args": {k: str(v) for k, v in vars(args).items()}, "pool": pool_size, "runs": results}
    (args.results / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"results in {args.results}, runs in {out}")


if __name__ == "__main__":
    main()
