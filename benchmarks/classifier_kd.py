"""CE-only vs the classifier family's methods for small students of the embedded MNIST classifier.

The student of the shipped recipes (a 16/32-channel CNN with a 32-d embedding, 55k parameters against
the teacher's 468k; for ``had`` a 2-block MLP-mixer over 4x4 patches, 48k) is trained for the same
steps, batch, learning rate and seeds on the embedded MNIST train split (4000 digits):

- ``ce``: ``classifier_kd`` with ``alpha: 0``, labels only (the baseline; the teacher is not run),
- ``kd``: ``mnist-classifier-kd`` as shipped (T = 4, alpha = 0.9),
- ``lelp``: ``mnist-lelp`` as shipped (2 directions = 4 pseudo-subclasses per digit, T = 4, alpha = 0.9),
- ``dmae``: ``mnist-dmae`` as shipped (half the steps masked pre-training, 75 % of the patches masked,
  L1 to the teacher's conv features; then CE),
- ``ce_mixer``: ``mnist-had`` with ``pretrain: 0``: the mixer student on labels only (its baseline),
- ``had``: ``mnist-had`` as shipped (the mixer student: half the steps visible-patch feature alignment
  + masked-patch reconstruction; then CE),
- class-incremental, digits 0-4 then 5-9 (half the steps each, no replay): ``finetune`` is
  ``mnist-prototype-relation`` with ``relation_weight: 0`` (plain fine-tuning on the sequence),
  ``prototype_relation`` the recipe as shipped; they also report accuracy on the old task's digits
  (0-4) and the new task's (5-9) after the whole sequence,

and scored on the held-out eval split (1000 digits the teacher never saw): top-1 accuracy, expected
calibration error (15 bins) and top-1 agreement with the teacher, as mean +- standard deviation over
the seeds; CPU minutes are the training process's CPU time (``time.process_time``), teacher passes
included.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/classifier_kd.py  # 8 x 3 runs: ~15 CPU min
    ... --methods ce,dmae,ce_mixer,had   # re-runs those, keeps the others' runs

Writes ``results.json`` and ``results.md`` into ``--results`` (default
``benchmarks/results/classifier_kd``) after every run, keeping the runs already there (same steps and
batch) of the methods and seeds not re-run; the run directories go to ``--out`` (default: a temporary
one).
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
    "dmae": ("mnist-dmae", []),
    "ce_mixer": ("mnist-had", ["method.pretrain=0"]),
    "had": ("mnist-had", []),
    "finetune": ("mnist-prototype-relation", ["method.relation_weight=0"]),
    "prototype_relation": ("mnist-prototype-relation", []),
}
METRICS = ("accuracy", "ece", "top1_agreement", "cpu_min")
CONTINUAL = ("old_accuracy", "new_accuracy", "accuracy")  # the class-incremental rows' extra table


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
        **{k: final[k] for k in ("accuracy", "ece", "top1_agreement", *CONTINUAL) if k in final},
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
                for k in (*METRICS, *CONTINUAL)
                if k in rows[0]
            }
    return out


def kept_runs(path: Path, rerun: set[tuple[str, int]], args) -> list[dict]:
    """The runs in an earlier ``results.json`` at the same steps and batch, less those re-run now."""
    if not path.is_file():
        return []
    earlier = json.loads(path.read_text())
    if any(earlier["args"].get(k) != str(getattr(args, k)) for k in ("steps", "batch")):
        return []
    return [r for r in earlier["runs"] if r["method"] in METHODS and (r["method"], r["seed"]) not in rerun]


def write(args, teacher: dict, results: list[dict]) -> str:
    """results.json and results.md of every run so far (after each run: a stopped benchmark keeps them)."""
    results = sorted(results, key=lambda r: (list(METHODS).index(r["method"]), r["seed"]))
    table = summary(results)
    text = markdown(table, teacher, args, sorted({r["seed"] for r in results}))
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "results.md").write_text(text)
    record = {"args": {k: str(v) for k, v in vars(args).items()}, "teacher": teacher, "runs": results}
    (args.results / "results.json").write_text(json.dumps({**record, "summary": table}, indent=2) + "\n")
    return text


def markdown(table: dict, teacher: dict, args, seeds: list[int]) -> str:
    lines = [
        "embedded MNIST classifier -> 16/32-channel CNN student (had: an MLP-mixer); "
        f"{args.steps} steps x batch {args.batch}, seeds {','.join(map(str, seeds))}, CPU, "
        f"{args.threads} thread(s); held-out eval split (1000 digits); "
        "mean +- std over seeds",
        "",
        "| method | accuracy | ECE (15 bins) | top-1 agreement | CPU min / run |",
        "|---|---:|---:|---:|---:|",
        f"| teacher (468k params) | {teacher['accuracy']:.4f} | {teacher['ece']:.4f} | - | - |",
    ]
    for label, m in table.items():
        cells = [f"{m[k][0]:.4f} +- {m[k][1]:.4f}" for k in METRICS[:3]] + [f"{m['cpu_min'][0]:.2f}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    continual = {label: m for label, m in table.items() if "old_accuracy" in m}
    if continual:
        lines += [
            "",
            "class-incremental: digits 0-4, then 5-9 (half the steps each, no replay); accuracy over all 10",
            "digits after the sequence, on the old task's eval digits and on the new task's",
            "",
            "| method | old task (0-4) | new task (5-9) | overall |",
            "|---|---:|---:|---:|",
        ]
        for label, m in continual.items():
            cells = [f"{m[k][0]:.4f} +- {m[k][1]:.4f}" for k in CONTINUAL]
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
    labels = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in labels if m not in METHODS]
    if unknown:
        parser.error(f"unknown method {unknown[0]!r}; choose from {','.join(METHODS)}")
    results = kept_runs(args.results / "results.json", {(m, s) for m in labels for s in seeds}, args)
    teacher = teacher_row()
    text = ""
    for seed in seeds:
        for label in labels:
            results.append(train(label, seed, args, out))
            r = results[-1]
            print(
                f"# {label} seed {seed}: accuracy {r['accuracy']:.4f} ECE {r['ece']:.4f} "
                f"agreement {r['top1_agreement']:.4f} ({r['cpu_min']:.2f} CPU min)",
                flush=True,
            )
            text = write(args, teacher, results)
    print("\n" + text)
    print(f"results in {args.results}, runs in {out}")


if __name__ == "__main__":
    main()
