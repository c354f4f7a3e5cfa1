"""CE-only vs Hinton KD vs LELP for the same small CNN student of the embedded MNIST classifier.

The student of the shipped recipes (``mnist-classifier-kd``, ``mnist-lelp``: a 16/32-channel CNN with
a 32-d embedding, 55k parameters against the teacher's 468k) is trained for the same steps, batch,
learning rate and seeds on the embedded MNIST train split (4000 digits) three ways:

- ``ce``: ``classifier_kd`` with ``alpha: 0``, labels only (the baseline; the teacher is not run),
- ``kd``: ``mnist-classifier-kd`` as shipped (T = 4, alpha = 0.9),
- ``lelp``: ``mnist-lelp`` as shipped (2 directions = 4 pseudo-subclasses per digit, T = 4, alpha = 0.9),

and scored on the held-out eval split (1000 digits the teacher never saw): top-1 accuracy, expected
calibration error (15 bins) and top-1 agreement with the teacher, as mean +- standard deviation over
the seeds; CPU minutes are the training process's CPU time (``time.process_time``), teacher pass
included.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/classifier_kd.py  # 3 x 3 runs: ~4 CPU min

Writes ``results.json`` and ``results.md`` into ``--results`` (default
``benchmarks/results/classifier_kd``); the run directories go to ``--out`` (default: a temporary one).
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

# label -> (shipped recipe, overrides)
METHODS: dict[str, tuple[str, list[str]]] = {
    "ce": ("mnist-classifier-kd", ["method.alpha=0"]),
    "kd": ("mnist-classifier-kd", []),
    "lelp": ("mnist-lelp", []),
}
METRICS = ("accuracy", "ece", "top1_agreement", "cpu_min")


def train(label: str, seed: int, args, out: Path) -> dict:
    from stillroom.core import recipe as recipes
    from stillroom.core.trainer import Trainer

    recipe_name, overrides = METHODS[label]
    shared = [
        f"train.steps={args.steps}",
        f"train.batch_size={args.batch}",
        f"train.seed={seed}",
        "train.device=cpu",
        "train.eval_every=0",
        "train.tensorboard=false",
    ]
    run_dir = out / f"{label}-seed{seed}"
    cpu, wall = time.process_time(), time.perf_counter()
    Trainer(recipes.load(recipe_name, [*overrides, *shared]), run_dir).fit()
    final = json.loads((run_dir / "run.json").read_text())["final_eval"]
    return {
        "method": label,
        "seed": seed,
        **{k: final[k] for k in ("accuracy", "ece", "top1_agreement")},
        "cpu_min": (time.process_time() - cpu) / 60,
        "wall_s": time.perf_counter() - wall,
    }


def teacher_row() -> dict:
    """The embedded teacher on the same held-out split, scored by the same functions."""
    import torch

    from stillroom.data import resolve
    from stillroom.plugins.classifier import data, metrics
    from stillroom.plugins.classifier.models import load_classifier

    teacher = load_classifier(resolve("embedded:mnist_classifier"))
    pixels, labels = data.load_split(data.DEFAULT, "eval")
    with torch.no_grad():
        logits = teacher(torch.from_numpy(teacher.config.spec().normalise(pixels))).double().numpy()
    probs = metrics.softmax(logits)
    return {
        "accuracy": metrics.accuracy(probs, labels),
        "ece": metrics.expected_calibration_error(probs, labels),
    }


def summary(results: list[dict]) -> dict[str, dict[str, tuple[float, float]]]:
    """method -> metric -> (mean, standard deviation over seeds)."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for label in METHODS:
        rows = [r for r in results if r["method"] == label]
        if rows:
            out[label] = {
                k: (statistics.mean(r[k] for r in rows), statistics.pstdev(r[k] for r in rows))
                for k in METRICS
            }
    return out


def markdown(table: dict, teacher: dict, args) -> str:
    lines = [
        f"embedded MNIST classifier -> 16/32-channel CNN student; {args.steps} steps x batch {args.batch}, "
        f"seeds {args.seeds}, CPU, {args.threads} thread(s); held-out eval split (1000 digits); "
        "mean +- std over seeds",
        "",
        "| method | accuracy | ECE (15 bins) | top-1 agreement | CPU min / run |",
        "|---|---:|---:|---:|---:|",
        f"| teacher (468k params) | {teacher['accuracy']:.4f} | {teacher['ece']:.4f} | - | - |",
    ]
    for label, m in table.items():
        cells = [f"{m[k][0]:.4f} +- {m[k][1]:.4f}" for k in METRICS[:3]] + [f"{m['cpu_min'][0]:.2f}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated, from: {','.join(METHODS)}"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="run directories (default: a temporary one)")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "classifier_kd")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    out = args.out or Path(tempfile.mkdtemp(prefix="classifier_kd_"))
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    results = []
    for seed in seeds:
        for label in [m.strip() for m in args.methods.split(",") if m.strip()]:
            results.append(train(label, seed, args, out))
            r = results[-1]
            print(
                f"# {label} seed {seed}: accuracy {r['accuracy']:.4f} ECE {r['ece']:.4f} "
                f"agreement {r['top1_agreement']:.4f} ({r['cpu_min']:.2f} CPU min)",
                flush=True,
            )
    teacher = teacher_row()
    table = summary(results)
    text = markdown(table, teacher, args)
    print("\n" + text)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "results.md").write_text(text)
    (args.results / "results.json").write_text(
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "teacher": teacher,
                "runs": results,
                "summary": table,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"results in {args.results}, runs in {out}")


if __name__ == "__main__":
    main()
