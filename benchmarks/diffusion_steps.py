"""Teacher vs distilled students on the embedded MNIST domain: quality per network evaluation.

Prints one table — the teacher at 50/25/10/4/1 DDIM steps and each method's student at 1/2/4 steps —
with FID-like (classifier features, NOT Inception FID), class accuracy, diversity (1.0 = as varied as
real digits) and wall time per image, and saves a PNG sample grid per row beside the table.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/diffusion_steps.py --out runs/diffusion_steps \
        --train-steps progressive=70,consistency=80,dmd2=40,vsd=40 --per-class 10

``--init dmd2=progressive`` starts each DMD2 student from the progressive student with the same step
count trained earlier in the run (list the source first in ``--methods``). ``--student LABEL=DIR``
adds rows for a student trained elsewhere (e.g. a second fine-tuning stage), scored on the same noise.

Students are trained by the shipped recipes (``stillroom/recipes/mnist-*.yaml``) with ``train.steps``
(one number, or ``method=N,...``) and ``student.steps`` overridden: one student per step count in
``--train-for`` (default 1 and 4); a row whose step count has no student of its own retargets the
nearest trained student (``load_generator(..., steps=k)``) and says so in the ``trained_for`` column.
An existing run directory is reused. The teacher samples with its own DDIM (x0 clipped as its
scheduler config says), or Euler for ``--teacher flow`` (the embedded flow-matching teacher, CFG 1.5).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from stillroom.core.fsio import write_json, write_text

METHODS = {
    "progressive": "mnist-progressive",
    "consistency": "mnist-consistency",
    "hypersd": "mnist-hypersd",
    "dmd2": "mnist-dmd2",
    "vsd": "mnist-vsd",
    "flow_map": "mnist-flow-map",
    "mdt": "mnist-mdt",
    "boot": "mnist-boot",
    "tbcm": "mnist-tbcm",
    "agd": "mnist-agd",
    "phased_dmd": "mnist-phased-dmd",
    "distill_dpo": "mnist-distill-dpo",
}
# --teacher NAME: (teacher spec, CFG scale of its reference rows = its card's recommended w)
TEACHERS = {"ddpm": ("embedded:mnist_teacher", 2.0), "flow": ("embedded:mnist_flow_teacher", 1.5)}


def save_grid(images: torch.Tensor, path: Path, per_row: int) -> None:
    from PIL import Image

    x = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().cpu()[:, 0]
    n, h, w = x.shape
    rows = (n + per_row - 1) // per_row
    grid = torch.zeros(rows * h, per_row * w, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, per_row)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = x[i]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.numpy()).save(path)


def parse_budgets(text: str) -> dict[str, int]:
    """``"200"`` -> {"*": 200}; ``"dmd2=40,vsd=30"`` -> {"dmd2": 40, "vsd": 30}."""
    out = {}
    for part in text.split(","):
        name, _, n = part.rpartition("=")
        out[name or "*"] = int(n)
    return out


def overrides_for(method: str, extra: str) -> list[str]:
    """The ``--extra`` overrides that apply to ``method``: unprefixed ones and ``method:KEY=VALUE``."""
    out = []
    for item in extra.split():
        name, sep, rest = item.partition(":")
        if not sep or "=" in name:
            out.append(item)
        elif name == method:
            out.append(rest)
    return out


def timed(fn, noise, labels, batch=250):
    start = time.perf_counter()
    with torch.no_grad():
        out = torch.cat(
            [fn(noise[i : i + batch], labels[i : i + batch]) for i in range(0, len(labels), batch)]
        )
    return out, (time.perf_counter() - start) / len(labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/diffusion_steps")
    ap.add_argument("--train-steps", default="200", help="N, or method=N,... per method")
    ap.add_argument("--train-for", default="1,4", help="student step counts that get their own student")
    ap.add_argument(
        "--extra", default="",
        help="extra recipe overrides, space separated: KEY=VALUE for every student, METHOD:KEY=VALUE for one",
    )  # fmt: skip
    ap.add_argument(
        "--init", default="", help="method=source,...: start that method's k-step student from source's"
    )
    ap.add_argument("--per-class", type=int, default=30)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument(
        "--student", action="append", default=[],
        help="LABEL=DIR: also score an already trained student directory (e.g. a chained fine-tune)",
    )  # fmt: skip
    ap.add_argument("--teacher-steps", default="50,25,10,4,1")
    ap.add_argument("--student-steps", default="1,2,4")
    ap.add_argument(
        "--teacher", default="ddpm",
        help="ddpm (DDIM rows), flow (Euler rows; for the flow methods) or a class-conditional 28/32px spec",
    )  # fmt: skip
    args = ap.parse_args()

    from stillroom.core import recipe as recipes
    from stillroom.core.trainer import Trainer
    from stillroom.plugins.diffusion import models as dm
    from stillroom.plugins.diffusion.metrics import evaluate_images, load_classifier
    from stillroom.plugins.diffusion.sampler import load_generator

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.teacher, guidance = TEACHERS.get(args.teacher, (args.teacher, 2.0))
    teacher = dm.load_teacher(args.teacher)
    classifier = load_classifier("cpu")
    labels = torch.arange(10).repeat_interleave(args.per_class)
    noise = torch.randn(
        len(labels),
        teacher.channels,
        teacher.image_size,
        teacher.image_size,
        generator=torch.Generator().manual_seed(0),
    )
    rows = []

    def record(name: str, steps: int, images: torch.Tensor, per_image: float, trained_for: int = 0) -> None:
        metrics = evaluate_images(images, labels, classifier)
        grid = out / f"{name}-{steps}step.png"
        first = images.view(10, args.per_class, *images.shape[1:])[:, :8]  # 8 samples of each digit
        save_grid(first.reshape(-1, *images.shape[1:]), grid, 8)
        rows.append(
            {
                "model": name,
                "steps": steps,
                "trained_for": trained_for or None,
                **metrics,
                "ms_per_image": per_image * 1e3,
                "grid": str(grid),
            }
        )
        print(
            f"{name:<14}{steps:>6}{(trained_for or '-'):>8}{metrics['fid_like']:>10.2f}"
            f"{metrics['class_accuracy']:>9.3f}{metrics['diversity']:>10.3f}{metrics['recall']:>8.3f}"
            f"{per_image * 1e3:>10.2f}",
            flush=True,
        )

    budgets = parse_budgets(args.train_steps)
    inits = dict(part.split("=") for part in args.init.split(",") if part)
    print(
        f"{'model':<14}{'steps':>6}{'trained':>8}{'fid_like':>10}{'acc':>9}{'divers.':>10}{'recall':>8}"
        f"{'ms/img':>10}"
    )
    for steps in [int(s) for s in args.teacher_steps.split(",") if s]:

        def sample(z, y, steps=steps):
            cond, uncond = dm.class_cond(y, teacher.null_class)
            return dm.teacher_sample(teacher, z, cond, uncond, steps, guidance)

        images, per = timed(sample, noise, labels)
        record("teacher", steps, images, per)

    def score_students(name: str, students: dict[int, Path]) -> None:
        for steps in [int(s) for s in args.student_steps.split(",")]:
            k = min(students, key=lambda k: (abs(k - steps), -k))
            g = load_generator(students[k], steps=steps)
            images, per = timed(lambda z, y, g=g: g(z, y), noise, labels)
            record(name, steps, images, per, k)

    train_for = [int(k) for k in args.train_for.split(",")]
    for method in args.methods.split(","):
        students = {}
        for k in train_for:
            if method == "vsd" and k != 1:  # SwiftBrush/SNOOPI students are one-step by construction
                continue
            run_dir = out / "runs" / f"{method}-{k}step"
            students[k] = run_dir / "student"
            if students[k].is_dir():
                continue
            n = budgets.get(method, budgets.get("*", 200))
            init = []
            if method in inits:
                init = [f"student.init={out / 'runs' / f'{inits[method]}-{k}step' / 'student'}"]
            rec = recipes.load(
                METHODS[method],
                [
                    f"train.steps={n}",
                    f"student.steps={k}",
                    "train.device=cpu",
                    "train.tensorboard=false",
                    "train.log_every=10",
                    f"teacher.path={args.teacher}",
                    *init,
                    *overrides_for(method, args.extra),
                ],
            )
            started = time.perf_counter()
            Trainer(rec, run_dir).fit()
            print(
                f"# trained {method} {k}-step for {n} steps in {time.perf_counter() - started:.0f}s",
                flush=True,
            )
        score_students(method, students)
    for item in args.student:
        label, _, path = item.partition("=")
        trained = json.loads((Path(path) / "stillroom.json").read_text())["sampler"]["steps"]
        score_students(label, {trained: Path(path)})
    write_json(out / "table.json", rows)
    write_text(out / "table.md", markdown(rows, args))
    print(f"# table: {out / 'table.md'} (and table.json); grids: {out}/*.png")


def markdown(rows: list[dict], args) -> str:
    """The table as markdown, with the command line that produced it."""
    lines = [
        "FID-like = Frechet distance on the shipped MNIST classifier's features (NOT Inception FID);",
        f"{args.per_class} samples per class, the teacher with its card's CFG (students have it baked in).",
        "",
        "| model | steps | student trained for | FID-like | class acc. | diversity | recall | ms/image |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['steps']} | {r['trained_for'] or '-'} | {r['fid_like']:.2f} | "
            f"{r['class_accuracy']:.3f} | {r['diversity']:.3f} | {r['recall']:.3f} | "
            f"{r['ms_per_image']:.1f} |"
        )
    lines += ["", "    " + shlex.join(["python", *sys.argv]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
